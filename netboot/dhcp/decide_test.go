package dhcp

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
)

type fakeBindings map[string]Binding

func (f fakeBindings) Binding(mac net.HardwareAddr) (Binding, bool) {
	b, ok := f[mac.String()]
	return b, ok
}

var (
	knownMAC   = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}
	declMAC    = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}
	unknownMAC = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 9}
	vmIP       = netip.MustParseAddr("10.10.0.7")
	otherIP    = netip.MustParseAddr("10.10.0.8")
	serverIP   = netip.MustParseAddr("10.10.0.1")
	relayIP    = netip.MustParseAddr("10.10.200.1")
	testCfg    = Config{
		ServerIP:  serverIP,
		Prefix:    netip.MustParsePrefix("10.10.0.0/16"),
		DNS:       []netip.Addr{netip.MustParseAddr("10.10.0.1"), netip.MustParseAddr("9.9.9.9")},
		LeaseTime: 10 * time.Minute,
	}
	testBindings = fakeBindings{
		knownMAC.String(): {IP: vmIP, Hostname: "toy0"},
		declMAC.String():  {IP: otherIP, Hostname: "toy1", Declined: true},
	}
)

func packet(t *testing.T, mac net.HardwareAddr, mt dhcpv4.MessageType, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	p, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(mt)}, mods...)...)
	if err != nil {
		t.Fatal(err)
	}
	// Round-trip through bytes, as the server sees packets.
	p, err = dhcpv4.FromBytes(p.ToBytes())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDecide(t *testing.T) {
	reqIP := func(a netip.Addr) dhcpv4.Modifier {
		return dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(a.AsSlice()))
	}
	sid := func(a netip.Addr) dhcpv4.Modifier { return dhcpv4.WithOption(dhcpv4.OptServerIdentifier(a.AsSlice())) }
	ci := func(a netip.Addr) dhcpv4.Modifier { return dhcpv4.WithClientIP(a.AsSlice()) }
	relay := dhcpv4.WithRelay(relayIP.AsSlice())
	bcast := netip.MustParseAddrPort("255.255.255.255:68")
	for _, tc := range []struct {
		name   string
		pkt    *dhcpv4.DHCPv4
		reason Reason
		action Action
		reply  dhcpv4.MessageType // MessageTypeNone for no reply
		dest   netip.AddrPort
	}{
		{"discover", packet(t, knownMAC, dhcpv4.MessageTypeDiscover), ReasonOffer, ActionOffer, dhcpv4.MessageTypeOffer, bcast},
		{"discover via relay", packet(t, knownMAC, dhcpv4.MessageTypeDiscover, relay), ReasonOffer, ActionOffer, dhcpv4.MessageTypeOffer, netip.AddrPortFrom(relayIP, 67)},
		{"discover unknown", packet(t, unknownMAC, dhcpv4.MessageTypeDiscover), ReasonUnknownMAC, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"discover declined", packet(t, declMAC, dhcpv4.MessageTypeDiscover), ReasonDeclined, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"selecting", packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid(serverIP), reqIP(vmIP)), ReasonAckSelecting, ActionBind, dhcpv4.MessageTypeAck, bcast},
		{"selecting via relay", packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid(serverIP), reqIP(vmIP), relay), ReasonAckSelecting, ActionBind, dhcpv4.MessageTypeAck, netip.AddrPortFrom(relayIP, 67)},
		{"selecting other server", packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid(otherIP), reqIP(vmIP)), ReasonOtherServer, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"selecting wrong address", packet(t, knownMAC, dhcpv4.MessageTypeRequest, sid(serverIP), reqIP(otherIP)), ReasonNakWrongAddress, ActionNone, dhcpv4.MessageTypeNak, bcast},
		{"init-reboot", packet(t, knownMAC, dhcpv4.MessageTypeRequest, reqIP(vmIP)), ReasonAckInitReboot, ActionBind, dhcpv4.MessageTypeAck, bcast},
		{"init-reboot wrong address", packet(t, knownMAC, dhcpv4.MessageTypeRequest, reqIP(otherIP)), ReasonNakWrongAddress, ActionNone, dhcpv4.MessageTypeNak, bcast},
		{"init-reboot wrong address via relay", packet(t, knownMAC, dhcpv4.MessageTypeRequest, reqIP(otherIP), relay), ReasonNakWrongAddress, ActionNone, dhcpv4.MessageTypeNak, netip.AddrPortFrom(relayIP, 67)},
		{"renewing", packet(t, knownMAC, dhcpv4.MessageTypeRequest, ci(vmIP)), ReasonAckRenew, ActionBind, dhcpv4.MessageTypeAck, netip.AddrPortFrom(vmIP, 68)},
		{"rebinding wrong address", packet(t, knownMAC, dhcpv4.MessageTypeRequest, ci(otherIP), dhcpv4.WithBroadcast(true)), ReasonNakWrongAddress, ActionNone, dhcpv4.MessageTypeNak, bcast},
		{"request declined", packet(t, declMAC, dhcpv4.MessageTypeRequest, reqIP(otherIP)), ReasonNakWrongAddress, ActionNone, dhcpv4.MessageTypeNak, bcast},
		{"request without state", packet(t, knownMAC, dhcpv4.MessageTypeRequest), ReasonMalformedRequest, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"release", packet(t, knownMAC, dhcpv4.MessageTypeRelease, ci(vmIP), sid(serverIP)), ReasonRelease, ActionRelease, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"release other address", packet(t, knownMAC, dhcpv4.MessageTypeRelease, ci(otherIP)), ReasonReleaseMismatch, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"decline", packet(t, knownMAC, dhcpv4.MessageTypeDecline, reqIP(vmIP), sid(serverIP)), ReasonDecline, ActionDecline, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"decline other address", packet(t, knownMAC, dhcpv4.MessageTypeDecline, reqIP(otherIP), sid(serverIP)), ReasonDeclineMismatch, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		// RFC 2131 table 5: a DECLINE MUST name the server; one naming
		// another server, or none, is not ours to act on.
		{"decline other server", packet(t, knownMAC, dhcpv4.MessageTypeDecline, reqIP(vmIP), sid(otherIP)), ReasonOtherServer, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"decline naming no server", packet(t, knownMAC, dhcpv4.MessageTypeDecline, reqIP(vmIP)), ReasonOtherServer, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"inform", packet(t, knownMAC, dhcpv4.MessageTypeInform, ci(vmIP)), ReasonAckInform, ActionNone, dhcpv4.MessageTypeAck, netip.AddrPortFrom(vmIP, 68)},
		{"inform wrong address", packet(t, knownMAC, dhcpv4.MessageTypeInform, ci(otherIP)), ReasonInformMismatch, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
		{"offer from a client", packet(t, knownMAC, dhcpv4.MessageTypeOffer), ReasonUnsupportedType, ActionNone, dhcpv4.MessageTypeNone, netip.AddrPort{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(tc.pkt, testBindings, &testCfg)
			if d.Reason != tc.reason || d.Action != tc.action {
				t.Fatalf("Decide = %s/%d, want %s/%d", d.Reason, d.Action, tc.reason, tc.action)
			}
			if tc.reply == dhcpv4.MessageTypeNone {
				if d.Reply != nil {
					t.Fatalf("unexpected reply %s", d.Reply.Summary())
				}
				return
			}
			if d.Reply == nil {
				t.Fatalf("no reply, want %s", tc.reply)
			}
			if d.Dest != tc.dest {
				t.Errorf("dest %s, want %s", d.Dest, tc.dest)
			}
			r, err := dhcpv4.FromBytes(d.Reply.ToBytes())
			if err != nil {
				t.Fatalf("reply does not parse: %v", err)
			}
			checkReply(t, tc.pkt, r, tc.reply)
		})
	}
}

func checkReply(t *testing.T, req, r *dhcpv4.DHCPv4, mt dhcpv4.MessageType) {
	t.Helper()
	if r.MessageType() != mt {
		t.Fatalf("reply type %s, want %s", r.MessageType(), mt)
	}
	if r.OpCode != dhcpv4.OpcodeBootReply || r.TransactionID != req.TransactionID || r.ClientHWAddr.String() != req.ClientHWAddr.String() {
		t.Errorf("reply header %s does not answer %s", r.Summary(), req.Summary())
	}
	if !r.GatewayIPAddr.Equal(ip4(req.GatewayIPAddr)) {
		t.Errorf("giaddr %s, want %s copied", r.GatewayIPAddr, req.GatewayIPAddr)
	}
	if !r.ServerIdentifier().Equal(serverIP.AsSlice()) {
		t.Errorf("server identifier %s", r.ServerIdentifier())
	}
	if mt == dhcpv4.MessageTypeNak {
		if !r.YourIPAddr.Equal(net.IPv4zero) {
			t.Errorf("nak with yiaddr %s", r.YourIPAddr)
		}
		if addrOf(req.GatewayIPAddr).IsValid() && !r.IsBroadcast() {
			t.Errorf("nak through a relay without the broadcast bit")
		}
		return
	}
	inform := req.MessageType() == dhcpv4.MessageTypeInform
	wantYI := vmIP.AsSlice()
	if inform {
		wantYI = net.IPv4zero
	}
	if !r.YourIPAddr.Equal(wantYI) {
		t.Errorf("yiaddr %s, want %s", r.YourIPAddr, net.IP(wantYI))
	}
	if got := r.SubnetMask().String(); got != "ffff0000" {
		t.Errorf("mask %s", got)
	}
	if rt := r.Router(); len(rt) != 1 || !rt[0].Equal(serverIP.AsSlice()) {
		t.Errorf("router %v", rt)
	}
	if dns := r.DNS(); len(dns) != 2 || dns[1].String() != "9.9.9.9" {
		t.Errorf("dns %v", dns)
	}
	if b := r.BroadcastAddress(); b.String() != "10.10.255.255" {
		t.Errorf("broadcast %s", b)
	}
	if r.HostName() != "toy0" {
		t.Errorf("hostname %q", r.HostName())
	}
	lt := r.IPAddressLeaseTime(0)
	if inform && lt != 0 {
		t.Errorf("lease time %s in an ack to inform", lt)
	}
	if !inform && lt != 10*time.Minute {
		t.Errorf("lease time %s", lt)
	}
}

func TestDecideRejectsNonEthernet(t *testing.T) {
	p := packet(t, knownMAC, dhcpv4.MessageTypeDiscover)
	p.ClientHWAddr = append(p.ClientHWAddr, 0, 0)
	if d := Decide(p, testBindings, &testCfg); d.Reply != nil || d.Reason != ReasonBadHardware {
		t.Fatalf("8-byte chaddr: %s", d.Reason)
	}
	p = packet(t, knownMAC, dhcpv4.MessageTypeDiscover)
	p.OpCode = dhcpv4.OpcodeBootReply
	if d := Decide(p, testBindings, &testCfg); d.Reply != nil || d.Reason != ReasonNotRequest {
		t.Fatalf("bootreply: %s", d.Reason)
	}
	p = packet(t, knownMAC, dhcpv4.MessageTypeDiscover)
	p.Options.Del(dhcpv4.OptionDHCPMessageType)
	if d := Decide(p, testBindings, &testCfg); d.Reply != nil || d.Reason != ReasonNoMessageType {
		t.Fatalf("bootp: %s", d.Reason)
	}
}

// TestReplyOptions holds what Decide promises about the contents of its
// replies beyond the lease itself: the lease, renewal (T1, half the lease)
// and rebinding (T2, seven eighths) times, with one hour when the
// configuration says none; no DNS option when there are no name servers;
// the configured router over the server's own address; ciaddr zero in an
// OFFER and the client's own in an ACK; and the client identifier and
// relay agent information echoed only when the request carried them.
func TestReplyOptions(t *testing.T) {
	router := netip.MustParseAddr("10.10.0.254")
	clientID := dhcpv4.WithOption(dhcpv4.OptClientIdentifier([]byte{1, 0x52, 0x54, 0, 0, 0, 1}))
	agent := dhcpv4.WithOption(dhcpv4.OptGeneric(dhcpv4.OptionRelayAgentInformation, []byte{1, 2, 'p', '1'}))
	ci := dhcpv4.WithClientIP(vmIP.AsSlice())
	for _, tc := range []struct {
		name            string
		cfg             Config
		pkt             *dhcpv4.DHCPv4
		lease, t1, t2   time.Duration
		dns             int
		router, ciaddr  netip.Addr
		clientID, agent bool
	}{
		{name: "configured lease", cfg: testCfg, pkt: packet(t, knownMAC, dhcpv4.MessageTypeDiscover),
			lease: 10 * time.Minute, t1: 5 * time.Minute, t2: 8*time.Minute + 45*time.Second, dns: 2, router: serverIP, ciaddr: netip.IPv4Unspecified()},
		{name: "default lease, no DNS, a router", cfg: Config{ServerIP: serverIP, Prefix: testCfg.Prefix, Router: router},
			pkt:   packet(t, knownMAC, dhcpv4.MessageTypeDiscover),
			lease: time.Hour, t1: 30 * time.Minute, t2: 52*time.Minute + 30*time.Second, router: router, ciaddr: netip.IPv4Unspecified()},
		{name: "offer to a client that says its address", cfg: testCfg, pkt: packet(t, knownMAC, dhcpv4.MessageTypeDiscover, ci),
			lease: 10 * time.Minute, t1: 5 * time.Minute, t2: 8*time.Minute + 45*time.Second, dns: 2, router: serverIP, ciaddr: netip.IPv4Unspecified()},
		{name: "renewal ack", cfg: testCfg, pkt: packet(t, knownMAC, dhcpv4.MessageTypeRequest, ci, clientID, agent),
			lease: 10 * time.Minute, t1: 5 * time.Minute, t2: 8*time.Minute + 45*time.Second, dns: 2, router: serverIP, ciaddr: vmIP,
			clientID: true, agent: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(tc.pkt, testBindings, &tc.cfg)
			if d.Reply == nil {
				t.Fatalf("no reply: %s", d.Reason)
			}
			r, err := dhcpv4.FromBytes(d.Reply.ToBytes())
			if err != nil {
				t.Fatal(err)
			}
			if got := r.IPAddressLeaseTime(0); got != tc.lease {
				t.Errorf("lease time %s, want %s", got, tc.lease)
			}
			if got := r.IPAddressRenewalTime(0); got != tc.t1 {
				t.Errorf("renewal time (T1) %s, want %s", got, tc.t1)
			}
			if got := r.IPAddressRebindingTime(0); got != tc.t2 {
				t.Errorf("rebinding time (T2) %s, want %s", got, tc.t2)
			}
			if got := r.Options.Has(dhcpv4.OptionDomainNameServer); got != (tc.dns > 0) || len(r.DNS()) != tc.dns {
				t.Errorf("DNS option present %v with %v, want %d servers", got, r.DNS(), tc.dns)
			}
			if rt := r.Router(); len(rt) != 1 || !rt[0].Equal(tc.router.AsSlice()) {
				t.Errorf("router %v, want %s", rt, tc.router)
			}
			if !r.ClientIPAddr.Equal(tc.ciaddr.AsSlice()) {
				t.Errorf("ciaddr %s, want %s", r.ClientIPAddr, tc.ciaddr)
			}
			if got := r.Options.Get(dhcpv4.OptionClientIdentifier); (got != nil) != tc.clientID || (tc.clientID && !bytes.Equal(got, tc.pkt.Options.Get(dhcpv4.OptionClientIdentifier))) {
				t.Errorf("client identifier %x, want echoed %v", got, tc.clientID)
			}
			if got := r.Options.Get(dhcpv4.OptionRelayAgentInformation); (got != nil) != tc.agent || (tc.agent && !bytes.Equal(got, []byte{1, 2, 'p', '1'})) {
				t.Errorf("relay agent information %x, want echoed %v", got, tc.agent)
			}
		})
	}
}

// TestReasonNames checks that every reason has a metric name of its own
// and that a value outside the list is "unknown", not a panic.
func TestReasonNames(t *testing.T) {
	seen := map[string]Reason{}
	for r := Reason(0); r < numReasons; r++ {
		n := r.String()
		if n == "" || n == "unknown" {
			t.Errorf("reason %d has no name (%q)", r, n)
		}
		if o, dup := seen[n]; dup {
			t.Errorf("reasons %d and %d are both %q", o, r, n)
		}
		seen[n] = r
	}
	for _, r := range []Reason{-1, numReasons, numReasons + 1} {
		if n := r.String(); n != "unknown" {
			t.Errorf("Reason(%d) = %q, want unknown", r, n)
		}
	}
}
