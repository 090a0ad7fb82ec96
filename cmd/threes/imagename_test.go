package main_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/threes-dev/threes/appliance/threestest"
)

// TestImageImportNamesUserFile (issue 14): a refused import's error names the
// user's own file, never the server's temporary copy of it.
func TestImageImportNamesUserFile(t *testing.T) {
	env := threestest.Start(t)
	c := cli{t: t, bin: threesBin(t), global: []string{"--socket", env.Options.Socket}}

	// Not a whole number of sectors: the store refuses it as a raw disk.
	text := filepath.Join(t.TempDir(), "hostname")
	os.WriteFile(text, []byte("myhost\n"), 0o644)
	// A qcow2 signature with garbage after it: qemu-img's own words quote the file.
	fake := filepath.Join(t.TempDir(), "fake.qcow2")
	os.WriteFile(fake, []byte("QFI\xfbnot really a qcow2 image"), 0o644)
	for _, file := range []string{"/etc/hostname", text, fake} {
		if _, err := os.Stat(file); err != nil {
			continue
		}
		c.fail(1, "invalid argument", "image", "import", "junk", file)
		_, errOut, _ := c.run("image", "import", "junk", file)
		t.Logf("threes image import junk %s: %s", file, strings.TrimSpace(errOut))
		if !strings.Contains(errOut, "bad image: disk "+file+": ") || strings.Contains(errOut, ".upload-") ||
			strings.Contains(errOut, env.Options.StateDir) {
			t.Errorf("image import junk %s: %q, want it to say \"bad image: disk %s: \" and no server path", file, errOut, file)
		}
	}
	if strings.Contains(c.ok("image", "list"), "junk") {
		t.Error("image list shows junk after refused imports")
	}
}
