package metadata

import (
	"io"
	"mime"
	"mime/multipart"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/threes-dev/threes/internal/netnstest"
)

// vendorParts splits vendor-data as cloud-init does: MIME multipart, each
// part by its Content-Type.
func vendorParts(t *testing.T, body string) map[string]string {
	t.Helper()
	head, rest, ok := strings.Cut(body, "\n\n")
	if !ok || !strings.HasPrefix(head, "Content-Type: ") {
		t.Fatalf("vendor-data has no MIME header:\n%s", body)
	}
	mt, params, err := mime.ParseMediaType(strings.TrimPrefix(strings.SplitN(head, "\n", 2)[0], "Content-Type: "))
	if err != nil || mt != "multipart/mixed" {
		t.Fatalf("vendor-data type %q %v", mt, err)
	}
	parts := map[string]string{}
	mr := multipart.NewReader(strings.NewReader(rest), params["boundary"])
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("vendor-data part: %v\n%s", err, body)
		}
		b, _ := io.ReadAll(p)
		parts[strings.SplitN(p.Header.Get("Content-Type"), ";", 2)[0]] = string(b)
	}
	return parts
}

// TestVendorData: threes' vendor-data sets the hostname (YAML as cloud-init
// parses it) and carries the script that joins the tailnet, with the VM's
// name and the control server, and no secret: the key is fetched by the
// script at run time, and serving vendor-data does not take it.
func TestVendorData(t *testing.T) {
	for _, tc := range []struct {
		name, control, login string
		from                 netip.Addr
		hostname             string
	}{
		{"tailscale's control", "", "", ipA, "vm-a"},
		{"headscale", "http://100.64.0.1:8080", " --login-server='http://100.64.0.1:8080'", ipB, "vm-b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHandlerLab(t, Config{ControlURL: tc.control})
			r := h.do("GET", "/cloud-init/vendor-data", tc.from)
			if r.code != 200 {
				t.Fatalf("vendor-data: %+v", r)
			}
			for _, secret := range []string{authKey, secretVal} {
				if strings.Contains(r.body, secret) {
					t.Errorf("vendor-data holds a secret %q...", secret[:6])
				}
			}
			parts := vendorParts(t, r.body)
			if len(parts) != 2 {
				t.Fatalf("vendor-data parts %v, want cloud-config and shell script", parts)
			}
			cc := parts["text/cloud-config"]
			if !strings.HasPrefix(cc, "#cloud-config\n") {
				t.Errorf("cloud-config part does not start with #cloud-config:\n%s", cc)
			}
			var cfg map[string]any
			if err := yaml.Unmarshal([]byte(cc), &cfg); err != nil {
				t.Fatalf("cloud-config part is not YAML: %v\n%s", err, cc)
			}
			if len(cfg) != 2 || cfg["preserve_hostname"] != false || cfg["hostname"] != tc.hostname {
				t.Errorf("cloud-config %v, want preserve_hostname false and hostname %s", cfg, tc.hostname)
			}
			sh := parts["text/x-shellscript"]
			for _, want := range []string{"#!/bin/sh\n", "md='http://10.10.0.1'\n", "Metadata-Flavor: threes",
				"tailscale up --timeout=2m --auth-key=\"file:$dir/key\" --hostname='" + tc.hostname + "'" + tc.login + " ||"} {
				if !strings.Contains(sh, want) {
					t.Errorf("script lacks %q:\n%s", want, sh)
				}
			}
			if tc.login == "" && strings.Contains(sh, "--login-server") {
				t.Errorf("script names a login server for Tailscale's own:\n%s", sh)
			}
			if out, err := exec.Command("sh", "-n", "-c", sh).CombinedOutput(); err != nil {
				t.Errorf("sh -n: %v %s", err, out)
			}
			if r := h.do("GET", "/v1/token", tc.from, FlavorHeader, FlavorValue); r.code != 200 {
				t.Errorf("token after vendor-data: %+v, want it still there", r)
			}
		})
	}
}

func TestShellQuote(t *testing.T) {
	for _, v := range []string{"", "vm-a", "it's", "a b", `$(touch x)`, "'", "\\", "x\ny"} {
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(v)).Output()
		if err != nil || string(out) != v {
			t.Errorf("sh printf %s = %q, %v; want %q", shellQuote(v), out, err, v)
		}
	}
}

// TestVendorScript runs the vendor script as cloud-init would, as root in a
// VM's network namespace against a real server: it fetches the key with
// the header into a file only root can read, hands tailscale the file's
// path (never the key), and removes it. tailscale is a stand-in that
// records what it was given (the real client's join is the appliance's
// journey test); a second run finds the key taken and fails, and an image
// without tailscale skips the join and succeeds.
func TestVendorScript(t *testing.T) {
	netnstest.Require(t, "curl")
	l := newLab(t)
	vm := l.srv.Plug(t, bridge, "a", macA, ipA.String()+"/16")
	base, _ := l.serve(t, Config{ControlURL: "http://100.64.0.1:8080"})
	r := do(t, client(vm), "GET", base+"/cloud-init/vendor-data")
	script := vendorParts(t, r.body)["text/x-shellscript"]
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "vendor.sh"), []byte(script), 0o700))
	var runIn func(ns *netnstest.NS, script, path string) (string, error)
	bin := filepath.Join(dir, "bin")
	must(os.Mkdir(bin, 0o755))
	// The stand-in: "version --daemon" answers as a running tailscaled;
	// "up" records its arguments, and the key file's mode and contents.
	must(os.WriteFile(filepath.Join(bin, "tailscale"), []byte(`#!/bin/sh
[ "$1" = version ] && exit 0
printf '%s\n' "$@" >`+dir+`/args
f=$(printf '%s\n' "$@" | sed -n 's/^--auth-key=file://p')
stat -c '%a %U' "$f" >`+dir+`/mode
cat "$f" >`+dir+`/key
`), 0o755))
	run := func(path string) (string, error) {
		return runIn(vm, filepath.Join(dir, "vendor.sh"), path)
	}
	runIn = func(ns *netnstest.NS, script, path string) (string, error) {
		cmd := ns.Command("sh", script)
		cmd.Env = []string{"PATH=" + path}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run(bin + ":/usr/bin:/bin")
	if err != nil {
		t.Fatalf("vendor script: %v\n%s", err, out)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		must(err)
		return string(b)
	}
	args := read("args")
	if want := "up\n--timeout=2m\n--auth-key=file:/run/threes-tailscale."; !strings.HasPrefix(args, want) ||
		!strings.HasSuffix(args, "/key\n--hostname=vm-a\n--login-server=http://100.64.0.1:8080\n") {
		t.Errorf("tailscale got %q", args)
	}
	if m := read("mode"); m != "600 root\n" {
		t.Errorf("key file mode and owner %q, want 600 root", m)
	}
	if k := read("key"); k != authKey {
		t.Errorf("key file holds %q..., want the VM's key", k[:min(len(k), 6)])
	}
	keyFile := strings.TrimPrefix(strings.SplitN(args, "\n", 4)[2], "--auth-key=file:")
	if _, err := os.Stat(filepath.Dir(keyFile)); !os.IsNotExist(err) {
		t.Errorf("key's directory %s left behind: %v", filepath.Dir(keyFile), err)
	}
	for what, s := range map[string]string{"output": out, "arguments": args, "log": l.logs.String()} {
		if strings.Contains(s, authKey) {
			t.Errorf("the key is in the script's %s", what)
		}
	}

	// The key was taken: a second run says so and fails.
	if out, err := run(bin + ":/usr/bin:/bin"); err == nil || !strings.Contains(out, "auth key already taken") {
		t.Errorf("second run: %v\n%s", err, out)
	}
	// No tailscale: nothing to join, and nothing fails.
	if out, err := run("/usr/bin:/bin"); err != nil || !strings.Contains(out, "no tailscale in this image") {
		t.Errorf("run without tailscale: %v\n%s", err, out)
	}

	// A server that wants a session token: the script asks for one first.
	vmB := l.srv.Plug(t, bridge, "b", macB, ipB.String()+"/16")
	sbase, _ := l.serve(t, Config{RequireSession: true})
	r = do(t, client(vmB), "GET", sbase+"/cloud-init/vendor-data")
	must(os.WriteFile(filepath.Join(dir, "vendor-b.sh"), []byte(vendorParts(t, r.body)["text/x-shellscript"]), 0o700))
	if out, err := runIn(vmB, filepath.Join(dir, "vendor-b.sh"), bin+":/usr/bin:/bin"); err != nil {
		t.Fatalf("vendor script with sessions: %v\n%s", err, out)
	}
	if k, a := read("key"), read("args"); k != authKey+"-b" || !strings.HasSuffix(a, "/key\n--hostname=vm-b\n") {
		t.Errorf("with sessions tailscale got %q and a key of %d bytes", a, len(k))
	}
}
