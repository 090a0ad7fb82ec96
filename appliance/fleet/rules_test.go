package fleet

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
		want string // part of the error
	}{
		{"toy0", true, ""},
		{"cool-network", true, ""},
		{"abc", true, ""},
		{"az09", true, ""}, // each end of each range
		{"ab`", false, "letters, digits and hyphens"},
		{"ab{", false, "letters, digits and hyphens"},
		{"ab/", false, "letters, digits and hyphens"},
		{"ab:", false, "letters, digits and hyphens"},
		{"abA", false, "lowercase"},
		{"abZ", false, "lowercase"},
		{"ab@", false, "letters, digits and hyphens"},
		{"ab[", false, "letters, digits and hyphens"},
		{strings.Repeat("a", 63), true, ""},
		{"ab", false, "3 to 63"},
		{strings.Repeat("a", 64), false, "3 to 63"},
		{"-abc", false, "hyphen"},
		{"abc-", false, "hyphen"},
		{"Toy0", false, "lowercase"},
		{"toy_0", false, "letters, digits and hyphens"},
		{"toy.0", false, "letters, digits and hyphens"},
		{"töy0", false, "letters, digits and hyphens"},
		{"", false, "3 to 63"},
	} {
		err := ValidateName("name", tc.name)
		if tc.ok {
			if err != nil {
				t.Errorf("ValidateName(%q) = %v, want nil", tc.name, err)
			}
			continue
		}
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != "name" || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ValidateName(%q) = %v, want a FieldError on name containing %q", tc.name, err, tc.want)
		}
	}
}

func TestValidateKey(t *testing.T) {
	for _, tc := range []struct {
		k  string
		ok bool
	}{
		{"db-password", true},
		{"app/db/password", true},
		{"a.b_c-D9", true},
		// Each end of each range, then the character just outside each.
		{"azAZ09", true},
		{"a`", false},
		{"a{", false},
		{"a@", false},
		{"a[", false},
		{"a:", false},
		{"a+", false},
		{"...", true},
		{strings.Repeat("k", 128), true},
		{"", false},
		{strings.Repeat("k", 129), false},
		{"a b", false},
		{"/a", false},
		{"a/", false},
		{"a//b", false},
		{"../x", false},
		{"a/./b", false},
		{"..", false},
	} {
		if err := ValidateKey(tc.k); (err == nil) != tc.ok {
			t.Errorf("ValidateKey(%q) = %v, want ok=%v", tc.k, err, tc.ok)
		}
	}
}

func TestValidateDescription(t *testing.T) {
	for _, tc := range []struct {
		d  string
		ok bool
	}{
		{"", true},
		{"a web server ~ with punctuation!", true},
		{strings.Repeat("x", 256), true},
		{strings.Repeat("x", 257), false},
		{"tab\there", false},
		{"new\nline", false},
		{"caf\u00e9", false},
	} {
		if err := ValidateDescription(tc.d); (err == nil) != tc.ok {
			t.Errorf("ValidateDescription(%q) = %v, want ok=%v", tc.d, err, tc.ok)
		}
	}
}

func TestValidatePublicKey(t *testing.T) {
	for _, tc := range []struct {
		k  string
		ok bool
	}{
		{"", true},
		{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx me@laptop", true},
		{"ecdsa-sha2-nistp256 AAAAE2Vj", true},
		{"not a key", false},
		{"ssh-ed25519", false},
		{"ssh-ed25519 AAAA\nssh-rsa BBBB", false},
	} {
		if err := ValidatePublicKey(tc.k); (err == nil) != tc.ok {
			t.Errorf("ValidatePublicKey(%q) = %v, want ok=%v", tc.k, err, tc.ok)
		}
	}
}

func TestIDs(t *testing.T) {
	now := time.Date(2025, 6, 25, 19, 59, 1, 0, time.UTC)
	a, b := NewID(now), NewID(now.Add(time.Second))
	for _, id := range []string{a, b} {
		if err := ValidateID(id); err != nil {
			t.Errorf("ValidateID(NewID) = %v for %q", err, id)
		}
	}
	if a >= b {
		t.Errorf("IDs do not sort by time: %q >= %q", a, b)
	}
	// threes v0.1's documented ID has this shape; the alphabet ends at v.
	for _, good := range []string{"d1e4dplqs5f51296gtdg", "0123456789abcdefuv0a"} {
		if err := ValidateID(good); err != nil {
			t.Errorf("ValidateID(%q) = %v", good, err)
		}
	}
	for _, bad := range []string{"", "d1e4dplqs5f51296gtd", "d1e4dplqs5f51296gtdgx", "D1E4DPLQS5F51296GTDG", "d1e4dplqs5f51296gtdz", "d1e4dplqs5f51296gtdw", "d1e4dplqs5f51296gtd/", "d1e4dplqs5f51296gtd:"} {
		if ValidateID(bad) == nil {
			t.Errorf("ValidateID(%q) = nil, want error", bad)
		}
	}
}

func TestSizes(t *testing.T) {
	prev := Size{}
	for _, s := range Sizes {
		got, err := SizeOf(s.Type)
		if err != nil || got != s {
			t.Errorf("SizeOf(%q) = %v, %v", s.Type, got, err)
		}
		if s.VCPUs < prev.VCPUs || s.MemoryMiB <= prev.MemoryMiB {
			t.Errorf("size %s is not larger than %s", s.Type, prev.Type)
		}
		prev = s
	}
	if _, err := SizeOf("huge"); err == nil || !strings.Contains(err.Error(), "teeny, small, middy, biggun, fatlad") {
		t.Errorf("SizeOf(huge) = %v, want the list of types", err)
	}
}

func TestNewMAC(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		m := NewMAC().String()
		if !strings.HasPrefix(m, "52:54:00:") || len(m) != 17 {
			t.Fatalf("NewMAC() = %q", m)
		}
		seen[m] = true
	}
	if len(seen) < 90 {
		t.Errorf("NewMAC repeats: %d distinct of 100", len(seen))
	}
}

func TestKeyedMutex(t *testing.T) {
	var k keyedMutex
	unlock := k.lock("a")
	done := make(chan struct{})
	go func() { defer k.lock("b")(); close(done) }()
	<-done // a different key does not wait
	got := make(chan struct{})
	go func() { defer k.lock("a")(); close(got) }()
	// Wait until the second locker is queued on "a", then check it has not got in.
	for deadline := time.Now().Add(10 * time.Second); ; {
		k.mu.Lock()
		refs := k.m["a"].refs
		k.mu.Unlock()
		if refs == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("second locker never queued")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-got:
		t.Fatal("second lock of the same key did not wait")
	default:
	}
	unlock()
	<-got
	if len(k.m) != 0 {
		t.Errorf("keyedMutex kept %d entries after unlock", len(k.m))
	}
}
