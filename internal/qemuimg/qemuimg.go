// Package qemuimg runs qemu-img and copies image files: the one way hv makes VM
// disks and hv/images checks and stores base images.
package qemuimg

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// Run runs qemu-img with args and returns its standard output. A failed run is an
// *Error carrying qemu-img's own message.
func Run(ctx context.Context, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "qemu-img", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return stdout.Bytes(), &Error{Command: args[0], Msg: msg, Err: err}
	}
	return stdout.Bytes(), nil
}

// Error is a failed qemu-img run.
type Error struct {
	Command string // qemu-img's subcommand, e.g. "create"
	Msg     string // what qemu-img said
	Err     error  // how the process ended
}

func (e *Error) Error() string { return "qemu-img " + e.Command + ": " + e.Msg }
func (e *Error) Unwrap() error { return e.Err }

// Info is the part of `qemu-img info --output=json` threes reads.
type Info struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
	Encrypted       bool   `json:"encrypted"`
	FormatSpecific  struct {
		Data struct {
			Corrupt  bool   `json:"corrupt"`
			DataFile string `json:"data-file"`
		} `json:"data"`
	} `json:"format-specific"`
}

// ReadInfo runs qemu-img info on file, letting qemu-img probe the format if
// format is empty.
func ReadInfo(ctx context.Context, file, format string) (Info, error) {
	args := []string{"info", "--output=json"}
	if format != "" {
		args = append(args, "-f", format)
	}
	out, err := Run(ctx, append(args, file)...)
	if err != nil {
		return Info{}, err
	}
	var inf Info
	if err := json.Unmarshal(out, &inf); err != nil {
		return Info{}, fmt.Errorf("parse qemu-img info: %w", err)
	}
	return inf, nil
}

// CopyFile copies src to dst, which must not exist, syncs it and gives it perm.
// Go copies between files with copy_file_range, which shares extents on file
// systems that can; the copy goes in chunks so a cancelled ctx stops it. A dst
// left by a failed copy is the caller's to remove.
func CopyFile(ctx context.Context, src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	for err == nil {
		if err = ctx.Err(); err != nil {
			break
		}
		var n int64
		n, err = io.CopyN(out, in, copyChunk)
		if n < copyChunk && err == io.EOF {
			err = nil
			break
		}
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(dst, perm)
	}
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}

// copyChunk is how much CopyFile copies between checks of its context.
const copyChunk = 256 << 20
