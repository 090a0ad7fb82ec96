package embeddb

import (
	"context"
	"net/netip"
	"testing"
)

func TestAddresses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newDB(t)
	mustNetwork(t, db, "cool")
	// 10.10.0.10 sorts before 10.10.0.2 as text; the list is numeric.
	for _, n := range []int{10, 2, 300} {
		mustCreateVM(t, db, n, "cool")
	}
	as, err := db.ListAddresses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range as {
		got = append(got, a.IP.String()+"="+a.VMID)
	}
	want := []string{"10.10.0.2=vm-000002", "10.10.0.10=vm-000010", "10.10.1.44=vm-000300"}
	if len(got) != len(want) {
		t.Fatalf("ListAddresses = %v; want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("ListAddresses = %v; want %v", got, want)
		}
	}

	byMAC, err := db.AddressByMAC(ctx, "52-54-00-00-00-0A") // another notation, same MAC
	if err != nil || byMAC.IP != netip.MustParseAddr("10.10.0.10") || byMAC.MAC != "52:54:00:00:00:0a" {
		t.Fatalf("AddressByMAC = %+v, %v", byMAC, err)
	}
	byIP, err := db.AddressByIP(ctx, netip.MustParseAddr("::ffff:10.10.0.2")) // v4-mapped is the same address
	if err != nil || byIP.VMID != "vm-000002" || !byIP.LeasedAt.Equal(t0.Add(2e9)) {
		t.Fatalf("AddressByIP = %+v, %v", byIP, err)
	}

	_, err = db.AddressByIP(ctx, netip.MustParseAddr("10.10.9.9"))
	wantErr(t, err, ErrNotFound, FieldIP)
	_, err = db.AddressByMAC(ctx, "52:54:00:99:99:99")
	wantErr(t, err, ErrNotFound, FieldMAC)
	_, err = db.AddressByIP(ctx, netip.Addr{})
	wantErr(t, err, ErrInvalid, FieldIP)
	_, err = db.AddressByMAC(ctx, "zz:zz")
	wantErr(t, err, ErrInvalid, FieldMAC)
}
