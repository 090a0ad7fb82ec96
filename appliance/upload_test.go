package appliance_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
)

// TestImportErrorNamesFile: a refused upload's error calls the file by what it is
// ("disk"), not by the temporary path the server received it at, and keeps its
// code; nothing of the upload stays in the image store.
func TestImportErrorNamesFile(t *testing.T) {
	env := threestest.Start(t)
	ctx := ctxT(t)
	c := env.Local(t)
	for _, junk := range [][]byte{[]byte("myhost\n"), []byte("QFI\xfbnot really a qcow2 image")} {
		up, err := c.ImportImage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		up.Send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Header{Header: &threesv1.ImageHeader{Name: "junk"}}})
		up.Send(&threesv1.ImageUpload{Msg: &threesv1.ImageUpload_Part{Part: &threesv1.ImagePart{File: threesv1.ImageFile_IMAGE_FILE_DISK, Data: junk}}})
		_, err = up.CloseAndRecv()
		st, _ := status.FromError(err)
		t.Logf("import of %q: %v", junk, err)
		if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "bad image: disk: ") ||
			strings.Contains(st.Message(), ".upload-") || strings.Contains(st.Message(), env.Options.StateDir) {
			t.Errorf("import of %q = %v, want InvalidArgument saying \"bad image: disk: \" and no server path", junk, err)
		}
	}
	ents, err := os.ReadDir(filepath.Join(env.Options.StateDir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || e.Name() == "junk" {
			t.Errorf("image store holds %s after refused uploads", e.Name())
		}
	}
}
