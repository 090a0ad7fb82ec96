package metadata

import (
	"net/netip"
	"testing"
	"time"

	"github.com/threes-dev/threes/netboot/ipam"
)

type noOwners struct{}

func (noOwners) ByIP(netip.Addr) (a ipam.Allocation, ok bool) { return a, false }

func TestSessionToken(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	s, err := New(Config{Source: &memSource{}, IPAM: noOwners{}, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	other, err := New(Config{Source: &memSource{}, IPAM: noOwners{}, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	tok := s.newSession(ipA, now.Add(time.Minute))
	if err := s.checkSession(tok, ipA); err != nil {
		t.Fatalf("fresh token: %v", err)
	}
	for name, err := range map[string]error{
		"other address":    s.checkSession(tok, ipB),
		"other server key": other.checkSession(tok, ipA),
		"empty":            s.checkSession("", ipA),
		"garbage":          s.checkSession("!!!", ipA),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	now = now.Add(time.Minute)
	if err := s.checkSession(tok, ipA); err == nil {
		t.Errorf("expired token accepted")
	}
}
