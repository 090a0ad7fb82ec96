// Command threes runs the threes appliance (threes serve) and is its command-line client.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	root, g := newRoot()
	err := root.ExecuteContext(ctx)
	g.close()
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "threes:", errorLine(err))
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// errorLine turns an error into the one line a person reads: the server's message and,
// for API errors, the gRPC code in words.
func errorLine(err error) string {
	if s, ok := status.FromError(err); ok {
		if s.Code() == codes.Unavailable {
			return "cannot reach the threes server (is `threes serve` running, and is --address or --socket right?): " + s.Message()
		}
		return fmt.Sprintf("%s (%s)", s.Message(), codeWords(s.Code().String()))
	}
	return err.Error()
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
	timeoutMS int
	cleanups  []func()
}

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
			return nil
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVarP(&g.address, "address", "a", "threes:9999", "address of the threes server on the tailnet (ignored by serve)")
	pf.StringVar(&g.socket, "socket", "", "talk to the server on this host over its local socket instead (e.g. /run/threes/threes.sock)")
	pf.StringVar(&g.tsSocket, "tailscaled-socket", "", "tailscaled's LocalAPI socket, used when the OS cannot route to --address (default: tailscaled's own)")
	pf.StringVarP(&g.output, "output", "o", "text", "output format: text or json")
	pf.IntVar(&g.timeoutMS, "timeout-ms", 60000, "give up on a call after this many milliseconds")

	root.AddCommand(
		(&cmdServe{}).command(),
		(&cmdVM{global: g}).command(),
		(&cmdNetwork{global: g}).command(),
		(&cmdImage{global: g}).command(),
		(&cmdWhoAmI{global: g}).command(),
		(&cmdVersion{global: g}).command(),
	)
	return root, g
}
