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

	"github.com/threes-dev/threes/appliance/fleet"
	"github.com/threes-dev/threes/hv/images"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// ImportImage receives an upload into a hidden directory of the store, which the
// fleet then imports: the store checks each file (qemu-img for disks) first.
func (s *service) ImportImage(stream grpc.ClientStreamingServer[threesv1.ImageUpload, threesv1.Image]) error {
	first, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("image upload: %w", err)
	}
	h := first.GetHeader()
	if h == nil {
		return &fleet.FieldError{Field: "header", Msg: "an upload starts with the image's header"}
	}
	var dir string
	img, err := s.fleet.ImportImage(stream.Context(), h.GetName(), func(tmp string) (images.Source, error) {
		dir = tmp
		return receiveImage(stream, tmp, h.GetCmdline())
	})
	if err != nil && dir != "" {
		return uploadNames(err, dir) // the store names the image already
	}
	if err != nil {
		return err
	}
	return stream.SendAndClose(imageProto(img))
}

// receiveImage writes the upload's parts into dir, one file per kind, and says
// which is which.
func receiveImage(stream grpc.ClientStreamingServer[threesv1.ImageUpload, threesv1.Image], dir, cmdline string) (images.Source, error) {
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
			return images.Source{}, fmt.Errorf("image upload: %w", err)
		}
		part := msg.GetPart()
		if part == nil {
			return images.Source{}, &fleet.FieldError{Field: "part", Msg: "only the first message may be a header"}
		}
		which := part.GetFile()
		if _, ok := threesv1.ImageFile_name[int32(which)]; !ok || which == threesv1.ImageFile_IMAGE_FILE_UNSPECIFIED {
			return images.Source{}, &fleet.FieldError{Field: "file", Msg: fmt.Sprintf("unknown image file %d", which)}
		}
		f := files[which]
		if f == nil {
			name := strings.ToLower(strings.TrimPrefix(which.String(), "IMAGE_FILE_"))
			if f, err = os.Create(filepath.Join(dir, name)); err != nil {
				return images.Source{}, fmt.Errorf("image upload: %w", err)
			}
			files[which] = f
		}
		if _, err := f.Write(part.GetData()); err != nil {
			return images.Source{}, fmt.Errorf("image upload: %w", err)
		}
	}
	src := images.Source{Cmdline: cmdline}
	for which, f := range files {
		if err := f.Close(); err != nil {
			return images.Source{}, fmt.Errorf("image upload: %w", err)
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
	return src, nil
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
	imgs, err := s.fleet.Images()
	if err != nil {
		return nil, err
	}
	resp := &threesv1.ListImagesResponse{}
	for _, img := range imgs {
		resp.Images = append(resp.Images, imageProto(img))
	}
	return resp, nil
}

func (s *service) DeleteImage(ctx context.Context, ref *threesv1.ImageRef) (*emptypb.Empty, error) {
	if err := s.fleet.DeleteImage(ctx, ref.GetName()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}
