package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/sshd"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
)

// sshRun runs an SSH session's command with the CLI's own command tree, over the
// connection the appliance made for the session: output, -o json, messages and exit
// codes are the CLI's, and every call is authorised as the session's caller.
func sshRun(ctx context.Context, s sshd.Session) int {
	root, g := newRoot()
	g.conn = s.Conn
	refused := sshTree(root)
	if len(s.Args) == 0 {
		return sshWelcome(ctx, root, refused, s)
	}
	root.SetArgs(s.Args)
	root.SetIn(s.Stdin)
	root.SetOut(s.Stdout)
	root.SetErr(s.Stderr)
	err := root.ExecuteContext(ctx)
	g.close()
	if err != nil {
		fmt.Fprintln(s.Stderr, "threes:", g.errorLine(err))
		return exitCode(err)
	}
	return 0
}

// sshTree fits the tree to a session on the appliance: no serve, no flags that pick
// another server, and nothing that reads files, which over SSH would be the
// appliance host's files read with the appliance's rights. It returns the commands it
// refuses.
func sshTree(root *cobra.Command) map[string]bool {
	for _, c := range root.Commands() {
		if c.Name() == "serve" {
			root.RemoveCommand(c)
		}
	}
	pre := root.PersistentPreRunE
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		for _, name := range []string{"address", "socket", "tailscaled-socket"} {
			if cmd.Flags().Changed(name) {
				return usagef("--%s: an SSH session talks to the appliance it is on, and to no other server", name)
			}
		}
		return pre(cmd, args)
	}
	for _, name := range []string{"address", "socket", "tailscaled-socket"} {
		root.PersistentFlags().MarkHidden(name)
	}

	// A group (vm, vm kv, network, image) given a word it does not know would print
	// its help and succeed; over SSH that hides a typo from whatever called ssh.
	var groups func(c *cobra.Command)
	groups = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.HasSubCommands() && sub.RunE == nil && sub.Run == nil {
				sub.Args = cobra.ArbitraryArgs
				sub.RunE = func(cmd *cobra.Command, args []string) error {
					if len(args) > 0 {
						return usagef("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
					}
					return cmd.Help()
				}
			}
			groups(sub)
		}
	}
	groups(root)

	refused := map[string]bool{}
	if c, _, err := root.Find([]string{"image", "import"}); err == nil && c.Name() == "import" {
		c.RunE = func(cmd *cobra.Command, _ []string) error {
			return usagef("%s reads image files from the machine it runs on, which over SSH is the appliance: run `threes image import` on your own machine", cmd.CommandPath())
		}
		refused[c.CommandPath()] = true
	}
	if c, _, err := root.Find([]string{"vm", "create"}); err == nil && c.Name() == "create" {
		run := c.RunE
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if cmd.Flags().Changed("script") {
				return usagef("--script reads a file from the machine it runs on, which over SSH is the appliance: create the VM with `threes vm create` on your own machine")
			}
			return run(cmd, args)
		}
	}
	return refused
}

// sshMethods names the API method each command of the SSH tree calls first, so the
// greeting lists only what the caller's role allows; the roles come from the gate's
// own table. "" is a command that calls nothing (anyone with a role may run it).
var sshMethods = map[string]string{
	"threes vm create":      threesv1.Threes_Create_FullMethodName,
	"threes vm all":         threesv1.Threes_All_FullMethodName,
	"threes vm get":         threesv1.Threes_Get_FullMethodName,
	"threes vm get-id":      threesv1.Threes_GetID_FullMethodName,
	"threes vm start":       threesv1.Threes_Start_FullMethodName,
	"threes vm stop":        threesv1.Threes_Stop_FullMethodName,
	"threes vm restart":     threesv1.Threes_Restart_FullMethodName,
	"threes vm delete":      threesv1.Threes_Delete_FullMethodName,
	"threes vm purge":       threesv1.Threes_Purge_FullMethodName,
	"threes vm console":     threesv1.Threes_Console_FullMethodName,
	"threes vm kv get":      threesv1.Threes_GetKVs_FullMethodName,
	"threes vm kv set":      threesv1.Threes_UpsertKVs_FullMethodName,
	"threes vm kv delete":   threesv1.Threes_DeleteKVs_FullMethodName,
	"threes network create": threesv1.Threes_CreateNetwork_FullMethodName,
	"threes network delete": threesv1.Threes_DeleteNetwork_FullMethodName,
	"threes network list":   threesv1.Threes_ListNetworks_FullMethodName,
	"threes image list":     threesv1.Threes_ListImages_FullMethodName,
	"threes image delete":   threesv1.Threes_DeleteImage_FullMethodName,
	"threes host list":      threesv1.Threes_ListHosts_FullMethodName,
	"threes host remove":    threesv1.Threes_RemoveHost_FullMethodName,
	"threes whoami":         threesv1.Threes_WhoAmI_FullMethodName,
	"threes version":        "",
}

// sshLeaves returns the runnable commands of the tree, in the order help lists them.
func sshLeaves(c *cobra.Command) []*cobra.Command {
	var out []*cobra.Command
	for _, sub := range c.Commands() {
		if !sub.IsAvailableCommand() {
			continue
		}
		if sub.HasAvailableSubCommands() {
			out = append(out, sshLeaves(sub)...)
		} else if sub.Runnable() {
			out = append(out, sub)
		}
	}
	return out
}

// sshWelcome answers a session with no command: who the caller is, their role, and
// the commands that role may run.
func sshWelcome(ctx context.Context, root *cobra.Command, refused map[string]bool, s sshd.Session) int {
	me, err := threesv1.NewThreesClient(s.Conn).WhoAmI(ctx, &threesv1.WhoAmIRequest{})
	if err != nil {
		fmt.Fprintln(s.Stderr, "threes:", (&global{}).errorLine(err))
		return 1
	}
	role, err := tsauth.ParseRole(me.GetRole())
	if err != nil {
		fmt.Fprintln(s.Stderr, "threes:", err)
		return 1
	}
	w := s.Stdout
	fmt.Fprintf(w, "Hello %s", me.GetPrincipal())
	if me.GetNode() != "" {
		fmt.Fprintf(w, " on %s", me.GetNode())
	}
	fmt.Fprintf(w, ". Your role on this threes appliance is %s.\n\n", me.GetRole())
	fmt.Fprintln(w, "Commands you can run, as `ssh <appliance> COMMAND`:")
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for _, c := range sshLeaves(root) {
		path := c.CommandPath()
		method, known := sshMethods[path]
		if !known || refused[path] {
			continue
		}
		if method != "" {
			if need, ok := appliance.MethodRole(method); !ok || role < need {
				continue
			}
		}
		line := strings.TrimPrefix(path, root.Name()+" ")
		if _, args, ok := strings.Cut(c.Use, " "); ok {
			line += " " + args
		}
		fmt.Fprintf(tw, "  %s\t%s\n", line, c.Short)
	}
	tw.Flush()
	io.WriteString(w, `
Add -o json for JSON, --help to any command for its flags. A console needs a
terminal: ssh -t <appliance> vm console VM (Ctrl-] leaves). Nothing here runs a
shell: pipes and redirections belong on your side of ssh.
`)
	return 0
}
