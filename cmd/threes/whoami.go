package main

import (
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdWhoAmI struct{ global *global }

func (c *cmdWhoAmI) command() *cobra.Command {
	return &cobra.Command{
		Use:   "whoami",
		Short: "Show who the server sees you as, and your role",
		Args:  exactArgs(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			me, err := cl.WhoAmI(ctx, &threesv1.WhoAmIRequest{})
			if err != nil {
				return err
			}
			if c.global.output == "json" {
				return printJSON(cmd.OutOrStdout(), me)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintln(w, me.GetPrincipal())
			if me.GetNode() != "" {
				fmt.Fprintln(w, "    Node:", me.GetNode())
			}
			if len(me.GetTags()) > 0 {
				fmt.Fprintln(w, "    Tags:", strings.Join(me.GetTags(), ", "))
			}
			fmt.Fprintln(w, "    Role:", me.GetRole())
			return nil
		},
	}
}

// version is set at build time with -ldflags "-X main.version=..."; otherwise the
// module version the binary was built from.
var version = ""

type cmdVersion struct{ global *global }

func (c *cmdVersion) command() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary",
		Args:  exactArgs(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := version
			if v == "" {
				v = "(devel)"
				if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
					v = bi.Main.Version
				}
			}
			fmt.Fprintln(cmd.OutOrStdout(), "threes", v)
			return nil
		},
	}
}
