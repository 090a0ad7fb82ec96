//go:build tools

// Package deps pins modules before the code that imports them lands.
package deps

import (
	_ "github.com/digitalocean/go-libvirt"
	_ "github.com/insomniacslk/dhcp/dhcpv4/server4"
	_ "github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	_ "github.com/rqlite/rqlite/v8/store"
	_ "github.com/rqlite/rqlite/v8/cluster"
	_ "github.com/rqlite/rqlite/v8/tcp"
	_ "github.com/rqlite/rqlite/v8/command/sql"
	_ "github.com/rqlite/rqlite/v8/command/proto"
	_ "github.com/spf13/cobra"
	_ "github.com/vishvananda/netlink"
	_ "google.golang.org/grpc"
	_ "google.golang.org/protobuf/proto"
	_ "libvirt.org/go/libvirtxml"
	_ "tailscale.com/tsnet"
	_ "tailscale.com/client/local"
	_ "tailscale.com/client/tailscale/v2"
	_ "tailscale.com/tstest/integration/testcontrol"
	_ "tailscale.com/tstest/integration"
	_ "tailscale.com/feature/ssh"
	_ "tailscale.com/net/memnet"
	_ "github.com/tailscale/hujson"
)
