package appliance

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"context"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/threes-dev/threes/hv/images"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// ErrImageInUse means a VM (live, or deleted but not purged) still has a disk on the
// image, so the image cannot go.
var ErrImageInUse = errors.New("image in use")

// ImportImage receives an upload into a hidden directory of the store and then
// imports it: the store checks each file (qemu-img for disks) before accepting it.
func (s *service) ImportImage(stream grpc.ClientStreamingServer[threesv1.ImageUpload, threesv1.Image]) error {
	first, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("image upload: %w", err)
	}
	h := first.GetHeader()
	if h == nil {
		return fieldErr("header", "an upload starts with the image's header")
	}
	if err := images.ValidateName(h.GetName()); err != nil {
		return fieldErr("name", "%v", err)
	}
	// Refuse a taken name before receiving gigabytes.
	if _, err := s.images.Get(h.GetName()); err == nil {
		return fmt.Errorf("image %q: %w", h.GetName(), images.ErrExists)
	}
	tmp, err := os.MkdirTemp(s.images.Dir(), images.UploadPrefix)
	if err != nil {
		return fmt.Errorf("image upload: %w", err)
	}
	defer os.RemoveAll(tmp)

	files := map[threesv1.ImageFile]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("image upload: %w", err)
		}
		part := msg.GetPart()
		if part == nil {
			return fieldErr("part", "only the first message may be a header")
		}
		which := part.GetFile()
		if _, ok := threesv1.ImageFile_name[int32(which)]; !ok || which == threesv1.ImageFile_IMAGE_FILE_UNSPECIFIED {
			return fieldErr("file", "unknown image file %d", which)
		}
		f := files[which]
		if f == nil {
			name := strings.ToLower(strings.TrimPrefix(which.String(), "IMAGE_FILE_"))
			if f, err = os.Create(filepath.Join(tmp, name)); err != nil {
				return fmt.Errorf("image upload: %w", err)
			}
			files[which] = f
		}
		if _, err := f.Write(part.GetData()); err != nil {
			return fmt.Errorf("image upload: %w", err)
		}
	}
	src := images.Source{Cmdline: h.GetCmdline()}
	for which, f := range files {
		if err := f.Close(); err != nil {
			return fmt.Errorf("image upload: %w", err)
		}
		switch which {
		case threesv1.ImageFile_IMAGE_FILE_DISK:
			src.Disk = f.Name()
		case threesv1.ImageFile_IMAGE_FILE_KERNEL:
			src.Kernel = f.Name()
		case threesv1.ImageFile_IMAGE_FILE_INITRD:
			src.Initrd = f.Name()
		}
	}
	if src.Disk == "" && src.Kernel == "" {
		return fieldErr("file", "an image needs a disk, or a kernel (with an initrd and optionally a disk)")
	}
	img, err := s.images.Import(stream.Context(), h.GetName(), src)
	if err != nil {
		return uploadNames(err, tmp) // the store names the image already
	}
	return stream.SendAndClose(imageProto(img))
}

// uploadNames rewrites err's message to call the upload's files by what they are
// ("disk", "kernel", "initrd") instead of by the temporary path the server kept them
// at, which means nothing to the caller (the CLI then puts the user's own file
// name there). The error still wraps err, so its code stays the same.
func uploadNames(err error, dir string) error {
	msg := err.Error()
	for _, f := range []string{"disk", "kernel", "initrd"} {
		p := filepath.Join(dir, f)
		msg = strings.ReplaceAll(msg, f+" "+p, f) // "disk /x/.upload-1/disk: ..." reads "disk: ..."
		msg = strings.ReplaceAll(msg, p, f)
	}
	if msg == err.Error() {
		return err
	}
	return &renamed{msg, err}
}

type renamed struct {
	msg string
	err error
}

func (r *renamed) Error() string { return r.msg }
func (r *renamed) Unwrap() error { return r.err }

func (s *service) ListImages(ctx context.Context, _ *threesv1.ListImagesRequest) (*threesv1.ListImagesResponse, error) {
	imgs, err := s.images.List()
	if err != nil {
		return nil, err
	}
	resp := &threesv1.ListImagesResponse{}
	for _, img := range imgs {
		resp.Images = append(resp.Images, imageProto(img))
	}
	return resp, nil
}

// DeleteImage removes an image unless a VM still has a disk on it: overlays need
// their base until the VM is purged.
func (s *service) DeleteImage(ctx context.Context, ref *threesv1.ImageRef) (*emptypb.Empty, error) {
	if err := images.ValidateName(ref.GetName()); err != nil {
		return nil, fieldErr("name", "%v", err)
	}
	vms, err := s.db.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	var users []string
	for _, vm := range vms {
		if vm.Image == ref.GetName() {
			users = append(users, vm.Name)
		}
	}
	if len(users) > 0 {
		return nil, fmt.Errorf("image %q is used by %s (purge them first): %w", ref.GetName(), strings.Join(users, ", "), ErrImageInUse)
	}
	if err := s.images.Delete(ref.GetName()); err != nil {
		return nil, fmt.Errorf("image %q: %w", ref.GetName(), err)
	}
	return &emptypb.Empty{}, nil
}

func imageProto(img images.Image) *threesv1.Image {
	return &threesv1.Image{
		Name: img.Name, Kind: string(img.Kind), DiskFormat: img.DiskFormat, DiskBytes: uint64(img.DiskBytes),
		HasInitrd: img.Initrd != "", Cmdline: img.Cmdline, ImportedAt: timestamppb.New(img.ImportedAt),
	}
}
