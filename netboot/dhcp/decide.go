// Package dhcp serves DHCPv4 on the local bridge to the VMs the IPAM knows.
//
// Decide is the whole protocol logic as a pure function: a request, the
// bindings and the configuration in, a reply (or none) and why out, with no
// sockets and no clock. Server is the thin shell around it that owns the UDP
// socket, the lease table and the per-MAC rate limit. The package does not
// allocate addresses (package ipam does) nor persist anything.
package dhcp

import (
	"net"
	"net/netip"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

// Binding is what the server knows about one client MAC.
type Binding struct {
	// IP is the address the IPAM holds for the MAC.
	IP netip.Addr
	// Hostname is handed to the client in option 12 when set.
	Hostname string
	// Declined is true while the client's last DECLINE holds: the address
	// is in use by someone else on the wire, so it is not offered.
	Declined bool
}

// Bindings looks up clients by MAC; only MACs it returns are answered.
type Bindings interface {
	// Binding returns mac's binding, or false when the MAC is unknown.
	Binding(mac net.HardwareAddr) (Binding, bool)
}

// Config is what the server puts in its replies.
type Config struct {
	// ServerIP is the server identifier, the bridge's own address.
	ServerIP netip.Addr
	// Prefix is the bridge's network, for the mask and broadcast options.
	Prefix netip.Prefix
	// Router is the default gateway handed out; ServerIP when unset.
	Router netip.Addr
	// DNS lists the name servers handed out; none when empty.
	DNS []netip.Addr
	// LeaseTime is the lease duration; one hour when zero.
	LeaseTime time.Duration
}

// Action is the change to the lease table a decision asks the caller for.
type Action int

// The actions Decide asks for.
const (
	// ActionNone changes nothing.
	ActionNone Action = iota
	// ActionOffer records an outstanding offer.
	ActionOffer
	// ActionBind records a lease for LeaseTime from now.
	ActionBind
	// ActionRelease ends the client's lease.
	ActionRelease
	// ActionDecline marks the address as in use by someone else for a while.
	ActionDecline
)

// Reason says why Decide answered as it did; each has a counter in Stats.
type Reason int

// The reasons for a decision.
const (
	ReasonOffer Reason = iota
	ReasonAckSelecting
	ReasonAckInitReboot
	ReasonAckRenew
	ReasonAckInform
	ReasonNakWrongAddress
	ReasonRelease
	ReasonReleaseMismatch
	ReasonDecline
	ReasonDeclineMismatch
	ReasonOtherServer
	ReasonDeclined
	ReasonUnknownMAC
	ReasonNotRequest
	ReasonBadHardware
	ReasonNoMessageType
	ReasonUnsupportedType
	ReasonMalformedRequest
	ReasonInformMismatch
	ReasonUnparsable
	ReasonRateLimited
	ReasonRelayed
	numReasons
)

var reasonNames = [numReasons]string{
	ReasonOffer:            "offer",
	ReasonAckSelecting:     "ack_selecting",
	ReasonAckInitReboot:    "ack_init_reboot",
	ReasonAckRenew:         "ack_renew_rebind",
	ReasonAckInform:        "ack_inform",
	ReasonNakWrongAddress:  "nak_wrong_address",
	ReasonRelease:          "release",
	ReasonReleaseMismatch:  "release_mismatch",
	ReasonDecline:          "decline",
	ReasonDeclineMismatch:  "decline_mismatch",
	ReasonOtherServer:      "other_server",
	ReasonDeclined:         "declined_hold",
	ReasonUnknownMAC:       "unknown_mac",
	ReasonNotRequest:       "not_bootrequest",
	ReasonBadHardware:      "bad_hardware_address",
	ReasonNoMessageType:    "no_message_type",
	ReasonUnsupportedType:  "unsupported_type",
	ReasonMalformedRequest: "malformed_request",
	ReasonInformMismatch:   "inform_mismatch",
	ReasonUnparsable:       "unparsable",
	ReasonRateLimited:      "rate_limited",
	ReasonRelayed:          "relayed",
}

// String returns the reason's metric name.
func (r Reason) String() string {
	if r < 0 || r >= numReasons {
		return "unknown"
	}
	return reasonNames[r]
}

// Decision is the outcome of one request.
type Decision struct {
	// Reply is the packet to send, nil for none.
	Reply *dhcpv4.DHCPv4
	// Dest is where Reply goes, as RFC 2131 section 4.1 says.
	Dest netip.AddrPort
	// Action is the lease table change to make.
	Action Action
	// MAC and IP name the client and address Action applies to.
	MAC net.HardwareAddr
	IP  netip.Addr
	// Reason says why.
	Reason Reason
}

const (
	serverPort = 67
	clientPort = 68
)

var broadcastAddr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), clientPort)

// Decide answers one request. It never blocks, keeps no state and does not
// panic on any packet dhcpv4.FromBytes accepts.
func Decide(req *dhcpv4.DHCPv4, b Bindings, cfg *Config) Decision {
	d := Decision{}
	if req.OpCode != dhcpv4.OpcodeBootRequest {
		d.Reason = ReasonNotRequest
		return d
	}
	if req.HWType != iana.HWTypeEthernet || len(req.ClientHWAddr) != 6 {
		d.Reason = ReasonBadHardware
		return d
	}
	d.MAC = req.ClientHWAddr
	mt := req.MessageType()
	if mt == dhcpv4.MessageTypeNone {
		// A BOOTP request without DHCP options: not served.
		d.Reason = ReasonNoMessageType
		return d
	}
	bind, ok := b.Binding(req.ClientHWAddr)
	if !ok {
		d.Reason = ReasonUnknownMAC
		return d
	}
	d.IP = bind.IP
	switch mt {
	case dhcpv4.MessageTypeDiscover:
		if bind.Declined {
			d.Reason = ReasonDeclined
			return d
		}
		d.Reason, d.Action = ReasonOffer, ActionOffer
		d.Reply, d.Dest = reply(req, bind, cfg, dhcpv4.MessageTypeOffer)
	case dhcpv4.MessageTypeRequest:
		return decideRequest(req, bind, cfg, d)
	case dhcpv4.MessageTypeRelease:
		// RFC 2131 4.3.4: the client's address is in ciaddr; no reply.
		if addrOf(req.ClientIPAddr) != bind.IP {
			d.Reason = ReasonReleaseMismatch
			return d
		}
		d.Reason, d.Action = ReasonRelease, ActionRelease
	case dhcpv4.MessageTypeDecline:
		// RFC 2131 4.3.3: the declined address is in option 50; no reply.
		// The client MUST name the server (table 5): a DECLINE that
		// names another, or none, is not acted on.
		if addrOf(req.ServerIdentifier()) != cfg.ServerIP {
			d.Reason = ReasonOtherServer
			return d
		}
		if addrOf(req.RequestedIPAddress()) != bind.IP {
			d.Reason = ReasonDeclineMismatch
			return d
		}
		d.Reason, d.Action = ReasonDecline, ActionDecline
	case dhcpv4.MessageTypeInform:
		// RFC 2131 4.3.5: configuration only, sent to ciaddr, no lease.
		if addrOf(req.ClientIPAddr) != bind.IP {
			d.Reason = ReasonInformMismatch
			return d
		}
		d.Reason = ReasonAckInform
		d.Reply, d.Dest = reply(req, bind, cfg, dhcpv4.MessageTypeAck)
	default:
		d.Reason = ReasonUnsupportedType
	}
	return d
}

// decideRequest follows RFC 2131 4.3.2, telling the client's state from
// which of server identifier, requested address and ciaddr it filled in.
func decideRequest(req *dhcpv4.DHCPv4, bind Binding, cfg *Config, d Decision) Decision {
	sid := addrOf(req.ServerIdentifier())
	requested := addrOf(req.RequestedIPAddress())
	ciaddr := addrOf(req.ClientIPAddr)
	switch {
	case sid.IsValid():
		// SELECTING: answering an offer, ours or another server's.
		if sid != cfg.ServerIP {
			d.Reason = ReasonOtherServer
			return d
		}
		if requested != bind.IP || bind.Declined {
			return nak(req, cfg, d)
		}
		d.Reason = ReasonAckSelecting
	case requested.IsValid():
		// INIT-REBOOT: verifying a remembered address.
		if requested != bind.IP || bind.Declined {
			return nak(req, cfg, d)
		}
		d.Reason = ReasonAckInitReboot
	case ciaddr.IsValid():
		// RENEWING (unicast) or REBINDING (broadcast): extending a lease.
		if ciaddr != bind.IP || bind.Declined {
			return nak(req, cfg, d)
		}
		d.Reason = ReasonAckRenew
	default:
		d.Reason = ReasonMalformedRequest
		return d
	}
	d.Action = ActionBind
	d.Reply, d.Dest = reply(req, bind, cfg, dhcpv4.MessageTypeAck)
	return d
}

func nak(req *dhcpv4.DHCPv4, cfg *Config, d Decision) Decision {
	d.Reason = ReasonNakWrongAddress
	r := &dhcpv4.DHCPv4{
		OpCode:        dhcpv4.OpcodeBootReply,
		HWType:        req.HWType,
		TransactionID: req.TransactionID,
		ClientIPAddr:  net.IPv4zero,
		YourIPAddr:    net.IPv4zero,
		ServerIPAddr:  net.IPv4zero,
		GatewayIPAddr: ip4(req.GatewayIPAddr),
		ClientHWAddr:  req.ClientHWAddr,
		Options:       dhcpv4.Options{},
	}
	r.UpdateOption(dhcpv4.OptMessageType(dhcpv4.MessageTypeNak))
	r.UpdateOption(dhcpv4.OptServerIdentifier(cfg.ServerIP.AsSlice()))
	r.UpdateOption(dhcpv4.OptMessage("requested address is not this client's"))
	copyOption(r, req, dhcpv4.OptionClientIdentifier)
	copyOption(r, req, dhcpv4.OptionRelayAgentInformation)
	if gi := addrOf(req.GatewayIPAddr); gi.IsValid() {
		// 4.1: a NAK through a relay has the broadcast bit set so the
		// relay broadcasts it to the client.
		r.SetBroadcast()
		d.Dest = netip.AddrPortFrom(gi, serverPort)
	} else {
		d.Dest = broadcastAddr
	}
	d.Reply = r
	return d
}

// reply builds an OFFER or ACK for bind and where to send it.
func reply(req *dhcpv4.DHCPv4, bind Binding, cfg *Config, mt dhcpv4.MessageType) (*dhcpv4.DHCPv4, netip.AddrPort) {
	inform := req.MessageType() == dhcpv4.MessageTypeInform
	r := &dhcpv4.DHCPv4{
		OpCode:        dhcpv4.OpcodeBootReply,
		HWType:        req.HWType,
		TransactionID: req.TransactionID,
		Flags:         req.Flags,
		ClientIPAddr:  ip4(req.ClientIPAddr),
		YourIPAddr:    bind.IP.AsSlice(),
		ServerIPAddr:  net.IPv4zero,
		GatewayIPAddr: ip4(req.GatewayIPAddr),
		ClientHWAddr:  req.ClientHWAddr,
		Options:       dhcpv4.Options{},
	}
	if inform {
		// 4.3.5: no yiaddr and no lease time in an ACK to INFORM.
		r.YourIPAddr = net.IPv4zero
	}
	if mt == dhcpv4.MessageTypeOffer {
		// 4.3.1: ciaddr is zero in an OFFER.
		r.ClientIPAddr = net.IPv4zero
	}
	r.UpdateOption(dhcpv4.OptMessageType(mt))
	r.UpdateOption(dhcpv4.OptServerIdentifier(cfg.ServerIP.AsSlice()))
	mask := net.CIDRMask(cfg.Prefix.Bits(), 32)
	r.UpdateOption(dhcpv4.OptSubnetMask(mask))
	router := cfg.Router
	if !router.IsValid() {
		router = cfg.ServerIP
	}
	r.UpdateOption(dhcpv4.OptRouter(router.AsSlice()))
	if len(cfg.DNS) > 0 {
		dns := make([]net.IP, len(cfg.DNS))
		for i, a := range cfg.DNS {
			dns[i] = a.AsSlice()
		}
		r.UpdateOption(dhcpv4.OptDNS(dns...))
	}
	r.UpdateOption(dhcpv4.OptBroadcastAddress(broadcastOf(cfg.Prefix).AsSlice()))
	if bind.Hostname != "" {
		r.UpdateOption(dhcpv4.OptHostName(bind.Hostname))
	}
	if !inform {
		lt := cfg.LeaseTime
		if lt <= 0 {
			lt = time.Hour
		}
		r.UpdateOption(dhcpv4.OptIPAddressLeaseTime(lt))
		r.UpdateOption(dhcpv4.OptRenewTimeValue(lt / 2))
		r.UpdateOption(dhcpv4.OptRebindingTimeValue(lt * 7 / 8))
	}
	copyOption(r, req, dhcpv4.OptionClientIdentifier)
	copyOption(r, req, dhcpv4.OptionRelayAgentInformation)

	// 4.1: through a relay, to the relay's server port; to a configured
	// client, unicast to ciaddr; else broadcast, since unicasting to an
	// address the client does not have yet needs an ARP entry we cannot
	// make from a UDP socket, and the RFC allows broadcasting instead.
	switch gi, ci := addrOf(req.GatewayIPAddr), addrOf(req.ClientIPAddr); {
	case gi.IsValid():
		return r, netip.AddrPortFrom(gi, serverPort)
	case ci.IsValid():
		return r, netip.AddrPortFrom(ci, clientPort)
	default:
		return r, broadcastAddr
	}
}

func copyOption(dst, src *dhcpv4.DHCPv4, code dhcpv4.OptionCode) {
	if v := src.Options.Get(code); v != nil {
		dst.Options.Update(dhcpv4.OptGeneric(code, v))
	}
}

// addrOf returns ip as an IPv4 address, invalid for nil, zero or malformed.
func addrOf(ip net.IP) netip.Addr {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}
	}
	a = a.Unmap()
	if !a.Is4() || a.IsUnspecified() {
		return netip.Addr{}
	}
	return a
}

func ip4(ip net.IP) net.IP {
	if a := addrOf(ip); a.IsValid() {
		return a.AsSlice()
	}
	return net.IPv4zero
}

func broadcastOf(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := ^uint32(0) >> p.Bits()
	if p.Bits() == 0 {
		host = ^uint32(0)
	}
	b[0] |= byte(host >> 24)
	b[1] |= byte(host >> 16)
	b[2] |= byte(host >> 8)
	b[3] |= byte(host)
	return netip.AddrFrom4(b)
}
