package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/fleet"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdVM struct{ global *global }

func (c *cmdVM) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Manage virtual machines",
		Long:  "Manage virtual machines. Commands that take a VM accept its ID or the name of a live VM.",
	}
	cmd.AddCommand(
		(&cmdVMCreate{global: c.global}).command(),
		(&cmdVMAll{global: c.global}).command(),
		(&cmdVMGet{global: c.global}).command(),
		(&cmdVMGetID{global: c.global}).command(),
		c.action("start", "Start a stopped VM", func(cl threesv1.ThreesClient) vmCall { return cl.Start }),
		c.action("stop", "Stop a VM, gracefully first", func(cl threesv1.ThreesClient) vmCall { return cl.Stop }),
		c.action("restart", "Restart a VM", func(cl threesv1.ThreesClient) vmCall { return cl.Restart }),
		c.action("delete", "Stop a VM and mark it deleted (purge removes it for good)", func(cl threesv1.ThreesClient) vmCall { return cl.Delete }),
		(&cmdVMPurge{global: c.global}).command(),
		(&cmdConsole{global: c.global}).command(),
		(&cmdKV{global: c.global}).command(),
	)
	return cmd
}

type vmCall = func(ctx context.Context, ref *threesv1.VMRef, opts ...grpc.CallOption) (*threesv1.VM, error)

// action builds the commands that take one VM and return it: start, stop, restart, delete.
func (c *cmdVM) action(name, short string, pick func(threesv1.ThreesClient) vmCall) *cobra.Command {
	return &cobra.Command{
		Use:   name + " VM",
		Short: short,
		Args:  exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			id, err := resolveVM(ctx, cl, args[0])
			if err != nil {
				return err
			}
			vm, err := pick(cl)(ctx, &threesv1.VMRef{Id: id})
			if err != nil {
				return err
			}
			return c.global.showVM(cmd.OutOrStdout(), vm)
		},
	}
}

func (g *global) showVM(w io.Writer, vm *threesv1.VM) error {
	if g.output == "json" {
		return printJSON(w, vm)
	}
	printVM(w, vm)
	return nil
}

type cmdVMCreate struct {
	global      *global
	image       string
	network     string
	typ         string
	description string
	publicKey   string
	script      string
	kvs         []string
	secretKVs   []string
	wait        bool
	host        string
}

func (c *cmdVMCreate) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "create NAME",
		Short:   "Create and start a VM",
		Example: `  threes vm create -i base --network cool-network -k "$(cat ~/.ssh/id_ed25519.pub)" -c example/startup toy0`,
		Args:    exactArgs(1, "NAME"),
		RunE:    c.run,
	}
	f := cmd.Flags()
	f.StringVarP(&c.image, "image", "i", "", "base image to boot (required)")
	f.StringVar(&c.network, "network", "", "network the VM joins (required)")
	f.StringVarP(&c.typ, "type", "t", "teeny", "size: teeny, small, middy, biggun or fatlad")
	f.StringVarP(&c.description, "description", "d", "", "free text, printable ASCII, up to 256 characters")
	f.StringVarP(&c.publicKey, "key", "k", "", "SSH public key for the VM's user")
	f.StringVarP(&c.script, "script", "c", "", "file holding a startup script for the VM")
	f.StringArrayVar(&c.kvs, "kv", nil, "key=value to set on the VM (repeatable)")
	f.StringArrayVar(&c.secretKVs, "secret-kv", nil, "key=value to set as a secret (repeatable)")
	f.StringVar(&c.host, "host", "", "host of the cluster to run the VM on (default: the one with the most room)")
	f.BoolVar(&c.wait, "wait", false, "print each phase as the VM reaches it and return once it is on the tailnet (--timeout bounds the whole wait, default 5m)")
	cmd.MarkFlagRequired("image")
	cmd.MarkFlagRequired("network")
	return cmd
}

func (c *cmdVMCreate) run(cmd *cobra.Command, args []string) error {
	typ, ok := appliance.TypeOf(c.typ)
	if !ok {
		return usagef("--type: %q is not one of %s", c.typ, fleet.SizeNames())
	}
	req := &threesv1.CreateRequest{
		Name: args[0], Image: c.image, Network: c.network, Type: typ,
		Description: c.description, PublicKey: strings.TrimSpace(c.publicKey), Host: c.host,
	}
	if c.script != "" {
		b, err := os.ReadFile(c.script)
		if err != nil {
			return usagef("--script: %v", err)
		}
		req.Script = string(b)
	}
	for _, set := range []struct {
		list   []string
		secret bool
	}{{c.kvs, false}, {c.secretKVs, true}} {
		for _, s := range set.list {
			kv, err := parseKV(s, set.secret)
			if err != nil {
				return err
			}
			req.Kvs = append(req.Kvs, kv)
		}
	}
	if c.wait && !cmd.Flags().Changed("timeout") && !cmd.Flags().Changed("timeout-ms") {
		c.global.timeout = waitTimeout
	}
	cl, ctx, err := c.global.connect(cmd)
	if err != nil {
		return err
	}
	vm, err := cl.Create(ctx, req)
	if err != nil {
		return err
	}
	if !c.wait {
		return c.global.showVM(cmd.OutOrStdout(), vm)
	}
	// Phases go to stdout as text; with -o json to stderr, leaving stdout one VM.
	w := cmd.OutOrStdout()
	if c.global.output == "json" {
		w = cmd.ErrOrStderr()
	}
	fmt.Fprintf(w, "%s (%s): waiting for it to come onto the tailnet\n", vm.GetName(), vm.GetId())
	vm, err = waitForTailnet(ctx, cl, vm, w)
	if err != nil {
		return err
	}
	return c.global.showVM(cmd.OutOrStdout(), vm)
}

type cmdVMAll struct {
	global  *global
	deleted bool
}

func (c *cmdVMAll) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "all",
		Aliases: []string{"list", "ls"},
		Short:   "List VMs",
		Args:    exactArgs(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			stream, err := cl.All(ctx, &threesv1.AllRequest{IncludeDeleted: c.deleted})
			if err != nil {
				return err
			}
			// Each VM is written as it comes: a long list is never held whole.
			var add func(*threesv1.VM) error
			var done func() error
			if c.global.output == "json" {
				l := newJSONList(cmd.OutOrStdout())
				add, done = func(vm *threesv1.VM) error { return l.add(vm) }, l.close
			} else {
				t := newVMTable(cmd.OutOrStdout())
				add, done = func(vm *threesv1.VM) error { t.add(vm); return nil }, t.close
			}
			for {
				vm, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return done()
				}
				if err != nil {
					return err
				}
				if err := add(vm); err != nil {
					return err
				}
			}
		},
	}
	cmd.Flags().BoolVar(&c.deleted, "deleted", false, "include deleted VMs that are not yet purged")
	return cmd
}

type cmdVMGet struct{ global *global }

func (c *cmdVMGet) command() *cobra.Command {
	return &cobra.Command{
		Use:   "get VM",
		Short: "Show a VM",
		Args:  exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			id, err := resolveVM(ctx, cl, args[0])
			if err != nil {
				return err
			}
			vm, err := cl.Get(ctx, &threesv1.VMRef{Id: id})
			if err != nil {
				return err
			}
			return c.global.showVM(cmd.OutOrStdout(), vm)
		},
	}
}

type cmdVMGetID struct{ global *global }

func (c *cmdVMGetID) command() *cobra.Command {
	return &cobra.Command{
		Use:   "get-id NAME",
		Short: "Print the ID of the live VM with a name",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			resp, err := cl.GetID(ctx, &threesv1.GetIDRequest{Name: args[0]})
			if err != nil {
				return err
			}
			if c.global.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.GetId())
			return nil
		},
	}
}

type cmdVMPurge struct{ global *global }

func (c *cmdVMPurge) command() *cobra.Command {
	return &cobra.Command{
		Use:   "purge [VM_ID...]",
		Short: "Remove deleted VMs for good (all of them when none is named)",
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if !looksLikeID(a) {
					return usagef("purge takes VM IDs (deleted VMs have no live name): %q is not one", a)
				}
			}
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			resp, err := cl.Purge(ctx, &threesv1.PurgeRequest{Ids: args})
			if err != nil {
				return err
			}
			if c.global.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			for _, id := range resp.GetIds() {
				fmt.Fprintln(cmd.OutOrStdout(), "purged", id)
			}
			if len(resp.GetIds()) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "nothing to purge")
			}
			return nil
		},
	}
}

// exactArgs is cobra.ExactArgs with a message that names what is missing.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		switch {
		case len(args) == n:
			return nil
		case len(args) < n:
			return usagef("%s: missing %s (see --help)", cmd.CommandPath(), what)
		default:
			return usagef("%s: too many arguments: %q", cmd.CommandPath(), args[n:])
		}
	}
}
