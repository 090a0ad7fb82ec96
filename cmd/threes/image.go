package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

type cmdImage struct{ global *global }

func (c *cmdImage) command() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Manage the base images VMs boot from"}
	cmd.AddCommand((&cmdImageImport{global: c.global}).command(), c.list(), c.del())
	return cmd
}

type cmdImageImport struct {
	global                  *global
	kernel, initrd, cmdline string
}

func (c *cmdImageImport) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "import NAME [DISK]",
		Short: "Upload a base image: a qcow2 or raw disk, or a kernel and initrd (and optionally a disk)",
		Example: `  threes image import debian debian-12-generic-amd64.qcow2
  threes image import tiny --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0"`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usagef("%s: want NAME and a DISK, or NAME with --kernel", cmd.CommandPath())
			}
			if len(args) == 1 && c.kernel == "" {
				return usagef("%s: give a DISK file, or --kernel", cmd.CommandPath())
			}
			return nil
		},
		RunE: c.run,
	}
	f := cmd.Flags()
	f.StringVar(&c.kernel, "kernel", "", "kernel file, for an image QEMU boots directly")
	f.StringVar(&c.initrd, "initrd", "", "initrd file to go with --kernel")
	f.StringVar(&c.cmdline, "cmdline", "", "kernel command line to go with --kernel")
	return cmd
}

func (c *cmdImageImport) run(cmd *cobra.Command, args []string) error {
	parts := []struct {
		which threesv1.ImageFile
		path  string
	}{{threesv1.ImageFile_IMAGE_FILE_KERNEL, c.kernel}, {threesv1.ImageFile_IMAGE_FILE_INITRD, c.initrd}}
	if len(args) == 2 {
		parts = append(parts, struct {
			which threesv1.ImageFile
			path  string
		}{threesv1.ImageFile_IMAGE_FILE_DISK, args[1]})
	}
	// Open every file before connecting, so a typo fails at once.
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, p := range parts {
		if p.path == "" {
			files = append(files, nil)
			continue
		}
		f, err := os.Open(p.path)
		if err != nil {
			return usagef("%v", err)
		}
		files = append(files, f)
	}
	cl, ctx, err := c.global.connect(cmd)
	if err != nil {
		return err
	}
	up, err := cl.ImportImage(ctx)
	if err != nil {
		return err
	}
	if err := up.Send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Header{Header: &threesv1.ImageHeader{Name: args[0], Cmdline: c.cmdline}}}); err != nil {
		return sendErr(up.CloseAndRecv, err)
	}
	buf := make([]byte, 1<<20)
	for i, f := range files {
		if f == nil {
			continue
		}
		for {
			n, rerr := f.Read(buf)
			if n > 0 {
				part := &threesv1.ImagePart{File: parts[i].which, Data: buf[:n]}
				if err := up.Send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Part{Part: part}}); err != nil {
					return sendErr(up.CloseAndRecv, err)
				}
			}
			if errors.Is(rerr, io.EOF) {
				break
			}
			if rerr != nil {
				return fmt.Errorf("read %s: %w", f.Name(), rerr)
			}
		}
	}
	img, err := up.CloseAndRecv()
	if err != nil {
		return nameUserFiles(err, parts[0].path, parts[1].path, diskPath(args))
	}
	if c.global.output == "json" {
		return printJSON(cmd.OutOrStdout(), img)
	}
	disk := "none"
	if img.GetDiskFormat() != "" {
		disk = fmt.Sprintf("%s, %d MiB", img.GetDiskFormat(), img.GetDiskBytes()>>20)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s\n    Kind: %s\n    Disk: %s\n", img.GetName(), img.GetKind(), disk)
	return nil
}

func diskPath(args []string) string {
	if len(args) == 2 {
		return args[1]
	}
	return ""
}

// uploadPath matches where a server before 2026-11 named its copy of an upload;
// uploadFile where the server now calls a file by what it is: "bad image: disk: …",
// or quoted in qemu-img's words ('disk').
var (
	uploadPath = regexp.MustCompile(`\S*/\.upload-[0-9]+/(kernel|initrd|disk)\b`)
	uploadFile = regexp.MustCompile(`bad image: (kernel|initrd|disk):|'(kernel|initrd|disk)'`)
)

// nameUserFiles puts the person's own file names where the server's message names
// the uploaded files, keeping the error's code.
func nameUserFiles(err error, kernel, initrd, disk string) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	names := map[string]string{"kernel": kernel, "initrd": initrd, "disk": disk}
	msg := uploadPath.ReplaceAllStringFunc(st.Message(), func(m string) string {
		if name := names[uploadPath.FindStringSubmatch(m)[1]]; name != "" {
			return name
		}
		return m
	})
	msg = uploadFile.ReplaceAllStringFunc(msg, func(m string) string {
		sub := uploadFile.FindStringSubmatch(m)
		switch {
		case sub[1] != "" && names[sub[1]] != "":
			return "bad image: " + sub[1] + " " + names[sub[1]] + ":"
		case sub[2] != "" && names[sub[2]] != "":
			return "'" + names[sub[2]] + "'"
		}
		return m
	})
	return status.Error(st.Code(), msg)
}

// sendErr returns the server's reason when a send fails because the server ended the
// stream (for instance, refusing the image's name), rather than the bare EOF.
func sendErr(closeAndRecv func() (*threesv1.Image, error), err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := closeAndRecv(); rerr != nil {
			return rerr
		}
	}
	return err
}

func (c *cmdImage) list() *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List base images",
		Args:    exactArgs(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			resp, err := cl.ListImages(ctx, &threesv1.ListImagesRequest{})
			if err != nil {
				return err
			}
			if c.global.output == "json" {
				return printJSONList(cmd.OutOrStdout(), resp.GetImages())
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tKIND\tDISK\tIMPORTED")
			for _, img := range resp.GetImages() {
				disk := "-"
				if img.GetDiskBytes() > 0 {
					disk = fmt.Sprintf("%s %d MiB", img.GetDiskFormat(), img.GetDiskBytes()>>20)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", img.GetName(), img.GetKind(), disk, when(img.GetImportedAt()))
			}
			return tw.Flush()
		},
	}
}

func (c *cmdImage) del() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a base image no VM uses",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, ctx, err := c.global.connect(cmd)
			if err != nil {
				return err
			}
			if _, err := cl.DeleteImage(ctx, &threesv1.ImageRef{Name: args[0]}); err != nil {
				return err
			}
			if c.global.output == "text" {
				fmt.Fprintln(cmd.OutOrStdout(), "deleted", args[0])
			}
			return nil
		},
	}
}
