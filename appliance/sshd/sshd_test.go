package sshd

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		line string
		want []string
		err  string
	}{
		{"", nil, ""},
		{"   ", nil, ""},
		{"vm all", []string{"vm", "all"}, ""},
		{"  vm\tget   toy0 ", []string{"vm", "get", "toy0"}, ""},
		{`vm kv set toy0 'motd=hello world'`, []string{"vm", "kv", "set", "toy0", "motd=hello world"}, ""},
		{`vm kv set toy0 motd="it's; fine | really"`, []string{"vm", "kv", "set", "toy0", "motd=it's; fine | really"}, ""},
		{`vm get ''`, []string{"vm", "get", ""}, ""},
		{`vm get 'a$(b)'`, []string{"vm", "get", "a$(b)"}, ""},
		{"vm get *", []string{"vm", "get", "*"}, ""}, // no globbing: just a character
		{"vm get ~root", []string{"vm", "get", "~root"}, ""},
		{"vm all; reboot", nil, `";"`},
		{"vm all | grep x", nil, `"|"`},
		{"vm all && reboot", nil, `"&"`},
		{"vm all > /etc/passwd", nil, `">"`},
		{"vm all < /etc/passwd", nil, `"<"`},
		{"vm get $HOME", nil, `"$"`},
		{"vm get `id`", nil, "\"`\""},
		{`vm get a\ b`, nil, `"\\"`},
		{"vm get (x)", nil, `"("`},
		{"vm all\nreboot", nil, "control character"},
		{"vm get 'a\nb'", nil, "control character"},
		{"vm get \x00", nil, "control character"},
		{"vm get 'toy0", nil, "unclosed ' quote"},
		{`vm get "toy0`, nil, `unclosed " quote`},
	} {
		got, err := Split(tc.line)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Split(%q) = %q, %v; want an error mentioning %s", tc.line, got, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Split(%q) = %q, %v; want %q", tc.line, got, err, tc.want)
		}
	}
}

func FuzzSplit(f *testing.F) {
	for _, s := range []string{"vm all", `vm kv set a 'b=c d'`, `x "y`, "a;b", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		words, err := Split(line)
		if err != nil {
			return
		}
		// Whatever passes holds no control character, and outside quotes there
		// was no metacharacter: joining the words back never adds one.
		for _, w := range words {
			for _, r := range w {
				if r < 0x20 && r != '\t' || r == 0x7f {
					t.Fatalf("Split(%q) let control character %q through", line, r)
				}
			}
		}
		if !strings.ContainsAny(line, `'"`) && strings.ContainsAny(line, refused) {
			t.Fatalf("Split(%q) = %q, want a refusal", line, words)
		}
	})
}

func TestLogWords(t *testing.T) {
	for args, want := range map[string]string{
		"vm all":                              "vm all",
		"vm kv set toy0 password=hunter2":     "vm kv set toy0 …",
		"vm create -i base --secret-kv a=b x": "vm create …",
		"vm kv set --secret toy0 a=b":         "vm kv set …",
		"-o json vm all":                      "…",
		"vm get toy0":                         "vm get toy0",
	} {
		if got := logWords(strings.Fields(args)); got != want {
			t.Errorf("logWords(%q) = %q, want %q", args, got, want)
		}
		if strings.Contains(logWords(strings.Fields(args)), "hunter2") {
			t.Errorf("logWords(%q) logs the secret", args)
		}
	}
}

// TestHostKey: made once under the state dir, private to root, the same next time.
func TestHostKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssh")
	k1, err := HostKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, HostKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("host key mode %o, want 600", fi.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("host key dir mode %o, want 700", di.Mode().Perm())
	}
	k2, err := HostKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1.PublicKey().Marshal(), k2.PublicKey().Marshal()) {
		t.Error("host key changed between loads")
	}
	if k1.PublicKey().Type() != "ssh-ed25519" {
		t.Errorf("host key type %s", k1.PublicKey().Type())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("host key dir holds %d files, want just the key", len(entries))
	}
	os.WriteFile(filepath.Join(dir, HostKeyFile), []byte("junk"), 0o600)
	if _, err := HostKey(dir); err == nil || !strings.Contains(err.Error(), HostKeyFile) {
		t.Errorf("a corrupt host key gave %v, want an error naming the file (and no silent new key)", err)
	}
}
