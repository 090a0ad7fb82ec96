// Package appliance is the threes server's wiring: it opens the embedded database,
// the image store and the hypervisor, builds the fleet (package fleet, which owns
// every change to a VM), joins the tailnet, serves DHCP and metadata on the bridge,
// and serves the gRPC API behind one gate that authorises every call by who the
// caller is.
//
// The gRPC service here only translates: requests into the fleet's calls, the
// fleet's records into the API's messages (one table each way, api.go), and domain
// errors into gRPC codes (one table, errors.go).
package appliance
