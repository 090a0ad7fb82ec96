package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdNetwork struct{ global *global }

func (c *cmdNetwork) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "network",
		Short: "Manage logical networks: tailnet tags whose members reach each other",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "create NAME",
			Short: "Create a network",
			Args:  exactArgs(1, "NAME"),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, ctx, err := c.global.connect(cmd)
				if err != nil {
					return err
				}
				n, err := cl.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: args[0]})
				if err != nil {
					return err
				}
				return c.show(cmd, n)
			},
		},
		&cobra.Command{
			Use:   "delete NAME",
			Short: "Delete a network no live VM uses",
			Args:  exactArgs(1, "NAME"),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, ctx, err := c.global.connect(cmd)
				if err != nil {
					return err
				}
				if _, err := cl.DeleteNetwork(ctx, &threesv1.NetworkRequest{Name: args[0]}); err != nil {
					return err
				}
				if c.global.output == "text" {
					fmt.Fprintln(cmd.OutOrStdout(), "deleted", args[0])
				}
				return nil
			},
		},
		&cobra.Command{
			Use:     "list",
			Aliases: []string{"ls"},
			Short:   "List networks",
			Args:    exactArgs(0, ""),
			RunE: func(cmd *cobra.Command, _ []string) error {
				cl, ctx, err := c.global.connect(cmd)
				if err != nil {
					return err
				}
				resp, err := cl.ListNetworks(ctx, &threesv1.ListNetworksRequest{})
				if err != nil {
					return err
				}
				if c.global.output == "json" {
					return printJSONList(cmd.OutOrStdout(), resp.GetNetworks())
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tTAG\tCREATED")
				for _, n := range resp.GetNetworks() {
					fmt.Fprintf(tw, "%s\t%s\t%s\n", n.GetName(), n.GetTag(), when(n.GetCreatedAt()))
				}
				return tw.Flush()
			},
		},
	)
	return cmd
}

func (c *cmdNetwork) show(cmd *cobra.Command, n *threesv1.Network) error {
	if c.global.output == "json" {
		return printJSON(cmd.OutOrStdout(), n)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s\n    Tag: %s\n    Created At: %s\n", n.GetName(), n.GetTag(), when(n.GetCreatedAt()))
	return nil
}
