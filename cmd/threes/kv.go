package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdKV struct{ global *global }

func (c *cmdKV) command() *cobra.Command {
	cmd := &cobra.Command{Use: "kv", Short: "Manage a VM's key/values, which the VM reads from the metadata server"}
	cmd.AddCommand(c.get(), c.set(), c.del())
	return cmd
}

func (c *cmdKV) get() *cobra.Command {
	return &cobra.Command{
		Use:   "get VM",
		Short: "Show a VM's key/values (secret values need the operator role)",
		Args:  exactArgs(1, "VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.call(cmd, args[0], func(cl threesv1.ThreesClient, ctx context.Context, id string) (*threesv1.KVs, error) {
				return cl.GetKVs(ctx, &threesv1.VMRef{Id: id})
			})
		},
	}
}

func (c *cmdKV) set() *cobra.Command {
	var secret bool
	cmd := &cobra.Command{
		Use:   "set VM KEY=VALUE...",
		Short: "Set key/values on a VM",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usagef("%s: want a VM and at least one KEY=VALUE", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &threesv1.KVs{}
			for _, a := range args[1:] {
				kv, err := parseKV(a, secret)
				if err != nil {
					return err
				}
				req.Kvs = append(req.Kvs, kv)
			}
			return c.call(cmd, args[0], func(cl threesv1.ThreesClient, ctx context.Context, id string) (*threesv1.KVs, error) {
				req.VmId = id
				return cl.UpsertKVs(ctx, req)
			})
		},
	}
	cmd.Flags().BoolVar(&secret, "secret", false, "store the values as secrets: redacted for viewers, never logged")
	return cmd
}

func (c *cmdKV) del() *cobra.Command {
	return &cobra.Command{
		Use:   "delete VM KEY...",
		Short: "Remove keys from a VM",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usagef("%s: want a VM and at least one KEY", cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.call(cmd, args[0], func(cl threesv1.ThreesClient, ctx context.Context, id string) (*threesv1.KVs, error) {
				return cl.DeleteKVs(ctx, &threesv1.DeleteKVsRequest{VmId: id, Keys: args[1:]})
			})
		},
	}
}

// call resolves the VM, runs one key/value call and prints what the VM now holds.
func (c *cmdKV) call(cmd *cobra.Command, ref string, do func(threesv1.ThreesClient, context.Context, string) (*threesv1.KVs, error)) error {
	cl, ctx, err := c.global.connect(cmd)
	if err != nil {
		return err
	}
	id, err := resolveVM(ctx, cl, ref)
	if err != nil {
		return err
	}
	kvs, err := do(cl, ctx, id)
	if err != nil {
		return err
	}
	if c.global.output == "json" {
		return printJSON(cmd.OutOrStdout(), kvs)
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tVALUE\tSECRET")
	for _, kv := range kvs.GetKvs() {
		v := kv.GetValue()
		if kv.GetRedacted() {
			v = "(redacted)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\n", kv.GetKey(), v, kv.GetSecret())
	}
	return tw.Flush()
}

func parseKV(s string, secret bool) (*threesv1.KV, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return nil, usagef("%q is not KEY=VALUE", s)
	}
	return &threesv1.KV{Key: k, Value: v, Secret: secret}, nil
}
