// Command threes runs the threes appliance (threes serve) and is its command-line client.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	root, g := newRoot()
	err := root.ExecuteContext(ctx)
	g.close()
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "threes:", g.errorLine(err))
		os.Exit(exitCode(err))
	}
}

// exitCode is 2 for a mistake on the command line, ours or cobra's (a required flag
// left out, an unknown command), and 1 for a call that failed.
func exitCode(err error) int {
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command ") {
		return 2
	}
	return 1
}

// errorLine turns an error into the one line a person reads: the server's message and,
// for API errors, the gRPC code in words unless the message already says it.
func (g *global) errorLine(err error) string {
	s, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	// Unavailable is also what the server answers when it lacks a database
	// quorum or another host is down; only a call it never answered means it
	// could not be reached.
	if s.Code() == codes.Unavailable && !appliance.Answered(err) {
		hint := "is `threes serve` running, and is --address or --socket right?"
		if g.socket == "" {
			hint = "on the appliance's own host use --socket " + defaultSocket +
				"; elsewhere this host's tailscaled must be up on the same tailnet"
		}
		return fmt.Sprintf("cannot reach the threes server at %s (%s): %s", g.target(), hint, s.Message())
	}
	words := codeWords(s.Code().String())
	if strings.HasSuffix(s.Message(), words) {
		return s.Message()
	}
	return fmt.Sprintf("%s (%s)", s.Message(), words)
}

func codeWords(code string) string {
	out := make([]rune, 0, len(code)+4)
	for i, r := range code {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				out = append(out, ' ')
			}
			r += 'a' - 'A'
		}
		out = append(out, r)
	}
	return string(out)
}

// usageError is a mistake on the command line rather than a failed call.
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// global holds the flags every client command shares.
type global struct {
	address   string
	socket    string
	tsSocket  string
	output    string
	timeout   time.Duration
	timeoutMS int // the old --timeout-ms, kept hidden so scripts that use it still work
	cleanups  []func()
	// conn, when set, is the API connection every command uses (an SSH session's,
	// authorised as its caller) instead of one from --address or --socket.
	conn grpc.ClientConnInterface
}

// defaultSocket is where serve puts its admin socket unless told otherwise.
const defaultSocket = appliance.DefaultSocket

func newRoot() (*cobra.Command, *global) {
	g := &global{}
	root := &cobra.Command{
		Use:           "threes",
		Short:         "Manage a threes instance: VMs that come up on your tailnet",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if g.output != "text" && g.output != "json" {
				return usagef("--output: %q is not text or json", g.output)
			}
			if cmd.Flags().Changed("timeout-ms") && !cmd.Flags().Changed("timeout") {
				g.timeout = time.Duration(g.timeoutMS) * time.Millisecond
			}
			if g.timeout <= 0 {
				return usagef("--timeout: %v is not a positive duration (e.g. 60s, 5m)", g.timeout)
			}
			// Cobra checks required flags only after this hook, and reports a
			// missing one as a plain error: make it the usage mistake it is.
			if err := cmd.ValidateRequiredFlags(); err != nil {
				return usageError{err}
			}
			return nil
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVarP(&g.address, "address", "a", "threes:9999", "address of the threes server on the tailnet (ignored by serve)")
	pf.StringVar(&g.socket, "socket", "", "talk to the server on this host over its local socket instead (e.g. "+defaultSocket+")")
	pf.StringVar(&g.tsSocket, "tailscaled-socket", "", "tailscaled's LocalAPI socket, used when the OS cannot route to --address (default: tailscaled's own)")
	pf.StringVarP(&g.output, "output", "o", "text", "output format: text or json")
	pf.DurationVar(&g.timeout, "timeout", 60*time.Second, "give up on a call after this long, e.g. 30s or 5m")
	pf.IntVar(&g.timeoutMS, "timeout-ms", 60000, "give up on a call after this many milliseconds")
	pf.MarkDeprecated("timeout-ms", "use --timeout, a duration such as 60s")

	root.AddCommand(
		(&cmdServe{}).command(),
		(&cmdVM{global: g}).command(),
		(&cmdNetwork{global: g}).command(),
		(&cmdHost{global: g}).command(),
		(&cmdImage{global: g}).command(),
		(&cmdWhoAmI{global: g}).command(),
		(&cmdVersion{global: g}).command(),
	)
	refuseUnknownSubcommands(root)
	return root, g
}
