package appliance

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// Console joins a gRPC stream to a VM's serial console: what the guest writes goes
// out as it comes, what the caller sends goes in. It ends when either side does.
func (s *service) Console(stream grpc.BidiStreamingServer[threesv1.ConsoleInput, threesv1.ConsoleOutput]) error {
	first, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	con, vm, err := s.fleet.Console(ctx, first.GetVmId())
	if host, ok := s.ownerOf(ctx, err); ok {
		return s.forwardConsole(ctx, host, first, stream)
	}
	if err != nil {
		return err
	}
	defer con.Close()
	if len(first.GetData()) > 0 {
		if _, err := con.Write(first.GetData()); err != nil {
			return fmt.Errorf("console of vm %s: %w", vm.Name, err)
		}
	}

	// Keystrokes in; the loop ends when the caller closes its side or goes away.
	go func() {
		defer cancel()
		for {
			in, err := stream.Recv()
			if err != nil {
				return
			}
			if _, err := con.Write(in.GetData()); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := con.Read(buf)
		if n > 0 {
			if serr := stream.Send(&threesv1.ConsoleOutput{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) || ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return fmt.Errorf("console of vm %s: %w", vm.Name, err)
		}
	}
}
