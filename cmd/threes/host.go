package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdHost struct{ global *global }

func (c *cmdHost) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host",
		Short: "List the hosts that share this threes, or take one out",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:     "list",
			Aliases: []string{"ls"},
			Short:   "List the hosts: tailnet address, database role, whether they answer, capacity and what their VMs take",
			Long: `List the hosts that share this threes' database.

ROLE is the host's part in the database's Raft: leader, follower or nonvoter;
"alone" for the one host of a threes that is not clustered, and "-" for a host
that writes its row but is not a member (removed while it still ran).
REACHABLE says whether the host answering this call reached the host just now.
LAST CONTACT is when the host last wrote its row (at every reconcile pass).
VCPUS and MEMORY are what its live VMs take of its capacity after overcommit.`,
			Args: exactArgs(0, ""),
			RunE: func(cmd *cobra.Command, _ []string) error {
				cl, ctx, err := c.global.connect(cmd)
				if err != nil {
					return err
				}
				resp, err := cl.ListHosts(ctx, &threesv1.ListHostsRequest{})
				if err != nil {
					return err
				}
				if c.global.output == "json" {
					return printJSONList(cmd.OutOrStdout(), resp.GetHosts())
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tADDRESS\tROLE\tREACHABLE\tLAST CONTACT\tVCPUS\tMEMORY MIB\tVMS")
				for _, h := range resp.GetHosts() {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", h.GetName(), dash(h.GetTailnetIp()), dash(h.GetRole()),
						yesNo(h.GetReachable()), dash(when(h.GetLastContact())),
						used(uint64(h.GetVcpusAllocated()), uint64(h.GetVcpus()), h.GetMemoryMib() == 0),
						used(h.GetMemoryMibAllocated(), h.GetMemoryMib(), h.GetVcpus() == 0), h.GetVms())
				}
				return tw.Flush()
			},
		},
		&cobra.Command{
			Use:   "remove NAME",
			Short: "Take a host with no live VMs out of the cluster (ask another host than NAME)",
			Long: `Take a host out of the cluster: its row goes, then its place in the database's Raft.

Refused while the host runs live VMs (the error names them: delete them first),
and when NAME is the host answering the call (ask another host). Stop threes on
the removed host afterwards: it no longer has a database.`,
			Args: exactArgs(1, "NAME"),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, ctx, err := c.global.connect(cmd)
				if err != nil {
					return err
				}
				if _, err := cl.RemoveHost(ctx, &threesv1.HostRef{Name: args[0]}); err != nil {
					return err
				}
				if c.global.output == "text" {
					fmt.Fprintln(cmd.OutOrStdout(), "removed", args[0])
				}
				return nil
			},
		},
	)
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// used is "allocated/capacity"; a host that set no limit (both capacities zero)
// shows "any" for it.
func used(alloc, capacity uint64, otherZero bool) string {
	if capacity == 0 && otherZero {
		return fmt.Sprintf("%d/any", alloc)
	}
	return fmt.Sprintf("%d/%d", alloc, capacity)
}
