package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// escapeKey (Ctrl-]) leaves an interactive console, as it does in virsh and telnet.
const escapeKey = 0x1d

type cmdConsole struct{ global *global }

func (c *cmdConsole) command() *cobra.Command {
	return &cobra.Command{
		Use:   "console VM",
		Short: "Attach to a VM's serial console (Ctrl-] to leave)",
		Long: `Attach to a VM's serial console: first its recent output since the VM booted (up
to 64 KiB: the boot, the login prompt), then what the VM writes. Several people may
share one console; what any of them types goes to the VM. On a terminal, Ctrl-] leaves.
With stdin not a terminal (a pipe, /dev/null), its input goes to the VM and the output
keeps coming after stdin ends, until the VM stops, Ctrl-C, or --timeout if given.`,
		Example: `  threes vm console toy0
  threes vm console --timeout 30s toy0 </dev/null > toy0-console.log`,
		Args: exactArgs(1, "VM"),
		RunE: c.run,
	}
}

func (c *cmdConsole) run(cmd *cobra.Command, args []string) error {
	cl, ctx, err := c.global.connect(cmd)
	if err != nil {
		return err
	}
	id, err := resolveVM(ctx, cl, args[0])
	if err != nil {
		return err
	}
	// A console session lasts as long as the person wants: --timeout bounds it only
	// when given on the command line, and its end is then no error.
	session := cmd.Context()
	if cmd.Flags().Changed("timeout") || cmd.Flags().Changed("timeout-ms") {
		var cancel context.CancelFunc
		session, cancel = context.WithTimeout(session, c.global.timeout)
		defer cancel()
	}
	stream, err := cl.Console(session)
	if err != nil {
		return err
	}
	if err := stream.Send(&threesv1.ConsoleInput{VmId: id}); err != nil {
		return err
	}
	in := cmd.InOrStdin()
	interactive := false
	if f, ok := in.(*os.File); ok {
		// Through SyscallConn, not Fd: Fd puts the file in blocking mode, where the
		// reader below outlives the session when the VM stops; over SSH it would hold
		// the session's terminal open.
		rc, err := f.SyscallConn()
		if err != nil {
			return fmt.Errorf("console: %w", err)
		}
		var old *term.State
		rc.Control(func(fd uintptr) {
			if interactive = term.IsTerminal(int(fd)); interactive {
				old, err = term.MakeRaw(int(fd))
			}
		})
		if err != nil {
			return fmt.Errorf("console: %w", err)
		}
		if interactive {
			defer rc.Control(func(fd uintptr) { term.Restore(int(fd), old) })
			fmt.Fprintf(cmd.ErrOrStderr(), "Connected to %s's console. Ctrl-] leaves.\r\n", args[0])
		}
	}

	// Keystrokes out. Piped input just stops at EOF: closing our side would end
	// the session, and the VM's output is what someone piping in wants to see.
	leave := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := in.Read(buf)
			if n > 0 {
				data := buf[:n]
				if interactive {
					for i, b := range data {
						if b == escapeKey {
							data = data[:i]
							close(leave)
							break
						}
					}
				}
				if len(data) > 0 {
					if stream.Send(&threesv1.ConsoleInput{Data: append([]byte(nil), data...)}) != nil {
						return
					}
				}
			}
			select {
			case <-leave:
				stream.CloseSend()
				return
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	out := make(chan error, 1)
	go func() {
		for {
			msg, err := stream.Recv()
			if err != nil {
				out <- err
				return
			}
			if _, err := cmd.OutOrStdout().Write(msg.GetData()); err != nil {
				out <- err
				return
			}
		}
	}()
	select {
	case <-leave:
		return nil
	case err := <-out:
		// The VM stopped (EOF), or the person or --timeout ended the session.
		if errors.Is(err, io.EOF) || session.Err() != nil {
			return nil
		}
		return err
	}
}
