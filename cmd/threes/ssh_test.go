package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"tailscale.com/tsnet"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/appliance/threestest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// sshClient is an SSH client on a tailnet node, dialling the appliance over the
// tailnet with golang.org/x/crypto/ssh and offering no credentials at all.
type sshClient struct {
	t       *testing.T
	client  *ssh.Client
	hostKey ssh.PublicKey
}

func dialSSH(t *testing.T, env *threestest.Env, node *tsnet.Server) *sshClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr := netip.AddrPortFrom(env.IP, 22).String()
	c, err := tsauth.TailnetDialer(node)(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s over the tailnet: %v", addr, err)
	}
	sc := &sshClient{t: t}
	conn, chans, reqs, err := ssh.NewClientConn(c, addr, &ssh.ClientConfig{
		User: "whoever",
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			sc.hostKey = key
			return nil
		},
		Timeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh handshake with %s: %v", addr, err)
	}
	sc.client = ssh.NewClient(conn, chans, reqs)
	t.Cleanup(func() { sc.client.Close() })
	return sc
}

// run runs one command line in a new session and returns stdout, stderr and the exit
// status.
func (c *sshClient) run(line string) (string, string, int) {
	c.t.Helper()
	s, err := c.client.NewSession()
	if err != nil {
		c.t.Fatalf("new session: %v", err)
	}
	defer s.Close()
	var out, errb bytes.Buffer
	s.Stdout, s.Stderr = &out, &errb
	err = s.Run(line)
	return out.String(), errb.String(), exitStatus(c.t, line, err)
}

func exitStatus(t *testing.T, line string, err error) int {
	t.Helper()
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitStatus()
	default:
		t.Fatalf("ssh %q: %v", line, err)
		return -1
	}
}

func (c *sshClient) ok(line string) string {
	c.t.Helper()
	out, errOut, code := c.run(line)
	if code != 0 {
		c.t.Fatalf("ssh %q: exit %d: %s", line, code, errOut)
	}
	return out
}

// fail runs a command that must fail with one line on stderr mentioning mention.
func (c *sshClient) fail(wantCode int, mention, line string) {
	c.t.Helper()
	out, errOut, code := c.run(line)
	if code != wantCode {
		c.t.Fatalf("ssh %q: exit %d, want %d (stdout %q, stderr %q)", line, code, wantCode, out, errOut)
	}
	if n := strings.Count(strings.TrimSpace(errOut), "\n") + 1; n != 1 || !strings.Contains(errOut, mention) || out != "" {
		c.t.Fatalf("ssh %q: stdout %q, stderr %q; want nothing out and one line mentioning %q", line, out, errOut, mention)
	}
}

// TestSSH runs the command tree over SSH on the tailnet as callers of every role,
// and checks that each is authorised as itself, strangers and bad input run nothing,
// and a grant taken away is honoured by the next session.
func TestSSH(t *testing.T) {
	env := threestest.StartWith(t, func(o *appliance.Options) { o.SSH = sshRun })
	node := func(host, user string, tags ...string) tailnettest.NodeOptions {
		return tailnettest.NodeOptions{Hostname: host, User: user, Tags: tags}
	}
	admin := env.Client(t, threestest.ClientOptions{NodeOptions: node("admin-laptop", "alice@example.com"), Role: "admin"})
	operator := env.Client(t, threestest.ClientOptions{NodeOptions: node("ci-runner", "", "tag:ci"), Role: "operator"})
	viewer := env.Client(t, threestest.ClientOptions{NodeOptions: node("dash", "bob@example.com"), Role: "viewer"})
	stranger := env.Client(t, threestest.ClientOptions{NodeOptions: node("guest", "eve@example.com")})
	as := dialSSH(t, env, admin.Node)
	op := dialSSH(t, env, operator.Node)
	vw := dialSSH(t, env, viewer.Node)
	eve := dialSSH(t, env, stranger.Node)

	// The admin makes a network, the operator a VM with a secret, all over SSH.
	if out := as.ok("network create lab"); !strings.Contains(out, "lab") {
		t.Errorf("network create = %q", out)
	}
	out := op.ok("vm create -i base --network lab --kv colour=blue --secret-kv 'api-token=s3cret words' web1")
	if !strings.Contains(out, "web1") || !strings.Contains(out, "running") {
		t.Errorf("vm create = %q", out)
	}

	// vm all: the table, and -o json as the CLI prints it.
	if out := as.ok("vm all"); !strings.Contains(out, "web1") || !strings.Contains(out, "running") {
		t.Errorf("admin's vm all = %q", out)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(as.ok("-o json vm all")), &list); err != nil || len(list) != 1 || list[0]["name"] != "web1" {
		t.Fatalf("vm all -o json = %v, %v", list, err)
	}
	id, _ := list[0]["id"].(string)

	// Each caller is itself: the viewer sees the secret exists, not its value.
	if out := vw.ok("vm kv get web1"); !strings.Contains(out, "api-token") || !strings.Contains(out, "blue") || strings.Contains(out, "s3cret") {
		t.Errorf("viewer's kv get = %q, want api-token listed and its value redacted", out)
	}
	if out := op.ok("vm kv get web1"); !strings.Contains(out, "s3cret words") {
		t.Errorf("operator's kv get = %q, want the secret (quoted words kept whole)", out)
	}
	vw.fail(1, "viewer", "vm stop web1")
	op.ok("vm delete web1")
	op.fail(1, "needs role admin", "vm purge")
	if out := as.ok("vm all --deleted"); !strings.Contains(out, id) {
		t.Fatalf("the operator's refused purge removed the VM: %q", out)
	}
	if out := as.ok("vm purge"); !strings.Contains(out, "purged "+id) {
		t.Errorf("admin's vm purge = %q", out)
	}
	op.ok("vm create -i base --network lab web2")

	// A node with no grant is refused before anything runs: its delete leaves web2.
	eve.fail(1, "has no role", "vm delete web2")
	eve.fail(1, "has no role", "")
	if out := as.ok("vm get web2"); !strings.Contains(out, "running") {
		t.Errorf("after the stranger's delete, web2 = %q", out)
	}

	// Bad input: a clear error and nothing run.
	as.fail(2, `unknown command "frobnicate"`, "vm frobnicate web2")
	as.fail(2, `unknown command "frobnicate"`, "frobnicate")
	as.fail(2, "missing VM", "vm get")
	as.fail(2, "no shell", "vm delete web2; vm all")
	as.fail(2, "no shell", "vm delete web2 && echo done")
	as.fail(2, "no shell", "vm get $(vm delete web2)")
	as.fail(2, "no shell", "vm all | grep web2")
	as.fail(2, "no shell", "vm all > /tmp/threes-ssh-out")
	as.fail(2, "unclosed", "vm get 'web2")
	as.fail(2, "control character", "vm delete web2\nvm all")
	as.fail(1, `"web2;x"`, "vm get 'web2;x'") // quoted: just a character in a name
	as.fail(2, "--socket", "--socket /run/threes/threes.sock vm all")
	as.fail(2, "--script", "vm create -i base --network lab --script /etc/hostname web3")
	as.fail(2, "your own machine", "image import stolen /etc/hostname")
	if out := as.ok("vm all"); !strings.Contains(out, "web2") || strings.Contains(out, "web3") {
		t.Errorf("after bad input, vm all = %q", out)
	}
	if out := as.ok("image list"); strings.Contains(out, "stolen") {
		t.Errorf("image list = %q", out)
	}

	// No command: who you are, your role and what you may run.
	hello := func(c *sshClient) string {
		s, err := c.client.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		var out bytes.Buffer
		s.Stdout = &out
		if err := s.Shell(); err != nil {
			t.Fatal(err)
		}
		if err := s.Wait(); err != nil {
			t.Fatalf("ssh with no command: %v", err)
		}
		return out.String()
	}
	out = hello(as)
	for _, want := range []string{"alice@example.com", "admin-laptop", "role on this threes appliance is admin", "vm purge", "network create NAME", "vm console VM"} {
		if !strings.Contains(out, want) {
			t.Errorf("admin's greeting lacks %q:\n%s", want, out)
		}
	}
	out = hello(vw)
	if !strings.Contains(out, "role on this threes appliance is viewer") || !strings.Contains(out, "vm all") ||
		strings.Contains(out, "vm purge") || strings.Contains(out, "vm stop") || strings.Contains(out, "image import") {
		t.Errorf("viewer's greeting:\n%s", out)
	}

	// A grant taken away: once the appliance sees it (the API's identity cache
	// holds a grant up to 3 s), the next session on the very same SSH connection
	// is refused; given back, the next one runs with the new role.
	vw.ok("vm all")
	env.Tailnet.Revoke(env.Appliance.Tailnet(), viewer.Node, tsauth.Capability)
	waitRole(t, viewer, "none")
	vw.fail(1, "has no role", "vm all")
	env.Grant(viewer.Node, "operator")
	waitRole(t, viewer, "operator")
	vw.ok("vm stop web2")

	// A pty: the tree writes to a terminal (line endings become CRLF) and window
	// changes are taken.
	s, err := as.client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	var tout bytes.Buffer
	s.Stdout = &tout
	if err := s.RequestPty("xterm", 40, 100, ssh.TerminalModes{}); err != nil {
		t.Fatalf("pty: %v", err)
	}
	if err := s.Run("vm all"); err != nil {
		t.Fatalf("vm all on a pty: %v", err)
	}
	s.Close()
	if !strings.Contains(tout.String(), "web2") || !strings.Contains(tout.String(), "\r\n") {
		t.Errorf("vm all on a pty = %q", tout.String())
	}

	// The host key lives in the state dir and survives a restart.
	key := as.hostKey
	env.Restart(t)
	env.Grant(admin.Node, "admin") // the test tailnet's grants are per node, and the node is new
	again := dialSSH(t, env, admin.Node)
	if !bytes.Equal(again.hostKey.Marshal(), key.Marshal()) {
		t.Errorf("host key changed across a restart")
	}
	again.ok("vm get web2")
}

// waitRole waits until the appliance's API sees c with role.
func waitRole(t *testing.T, c *threestest.Client, role string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		me, err := c.WhoAmI(ctx, &threesv1.WhoAmIRequest{})
		cancel()
		if err == nil && me.GetRole() == role {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("role never became %s: %v, %v", role, me, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSSHCommandsKnown: every command an SSH session may run says which API method
// it calls, so the greeting lists what a role allows; a new command must be added.
func TestSSHCommandsKnown(t *testing.T) {
	root, _ := newRoot()
	refused := sshTree(root)
	seen := map[string]bool{}
	for _, c := range sshLeaves(root) {
		path := c.CommandPath()
		seen[path] = true
		if refused[path] {
			continue
		}
		method, ok := sshMethods[path]
		if !ok {
			t.Errorf("%s: not in sshMethods", path)
			continue
		}
		if _, ok := appliance.MethodRole(method); method != "" && !ok {
			t.Errorf("%s: method %s has no role in the gate", path, method)
		}
	}
	for path := range sshMethods {
		if !seen[path] {
			t.Errorf("sshMethods names %s, which the tree does not have", path)
		}
	}
	if c, _, err := root.Find([]string{"serve"}); err == nil && c.Name() == "serve" {
		t.Errorf("serve is in the SSH tree")
	}
}

// TestSSHOpenSSH: Debian's OpenSSH client against the appliance, through a loopback
// port that a tailnet node forwards to the appliance's port 22 (a stand-in for
// `tailscale nc`): trust on first use pins the host key, the exit status is the
// CLI's, and a pty works.
func TestSSHOpenSSH(t *testing.T) {
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true but no ssh client: install openssh-client")
		}
		t.Skip("no ssh client")
	}
	env := threestest.StartWith(t, func(o *appliance.Options) { o.SSH = sshRun })
	admin := env.Client(t, threestest.ClientOptions{NodeOptions: tailnettest.NodeOptions{Hostname: "desk", User: "alice@example.com"}, Role: "admin"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	dial := tsauth.TailnetDialer(admin.Node)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := dial(context.Background(), "tcp", netip.AddrPortFrom(env.IP, 22).String())
				if err != nil {
					return
				}
				defer up.Close()
				go io.Copy(up, c)
				io.Copy(c, up)
			}()
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	known := filepath.Join(t.TempDir(), "known_hosts")
	ssh := func(check string, args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(sshBin, append([]string{"-F", "/dev/null", "-p", port, "-o", "BatchMode=yes",
			"-o", "StrictHostKeyChecking=" + check, "-o", "UserKnownHostsFile=" + known,
			"-o", "HostKeyAlias=threes", "admin@127.0.0.1"}, args...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("ssh %v: %v", args, err)
		}
		return out.String(), errb.String(), code
	}

	if out, errOut, code := ssh("accept-new", "network", "create", "lab"); code != 0 || !strings.Contains(out, "lab") {
		t.Fatalf("first ssh: exit %d, %q, %q", code, out, errOut)
	}
	if b, err := os.ReadFile(known); err != nil || !strings.Contains(string(b), "threes ssh-ed25519 ") {
		t.Fatalf("known_hosts after the first connection: %q, %v", b, err)
	}
	// From now on only the pinned key is accepted.
	if out, errOut, code := ssh("yes", "vm", "create", "-i", "base", "--network", "lab", "web1"); code != 0 || !strings.Contains(out, "running") {
		t.Fatalf("vm create: exit %d, %q, %q", code, out, errOut)
	}
	if out, _, code := ssh("yes", "vm", "all", "-o", "json"); code != 0 || !strings.Contains(out, `"name": "web1"`) {
		t.Errorf("vm all -o json: exit %d, %q", code, out)
	}
	if _, errOut, code := ssh("yes", "vm", "get", "nosuch"); code != 1 || !strings.Contains(errOut, "nosuch") {
		t.Errorf("vm get nosuch: exit %d, %q", code, errOut)
	}
	if _, errOut, code := ssh("yes", "vm", "all", "|", "grep", "x"); code != 2 || !strings.Contains(errOut, "no shell") {
		t.Errorf("a pipe: exit %d, %q", code, errOut)
	}
	if out, _, code := ssh("yes", "-tt", "vm", "get", "web1"); code != 0 || !strings.Contains(out, "web1\r\n") {
		t.Errorf("vm get on a pty: exit %d, %q", code, out)
	}
	if out, _, code := ssh("yes"); code != 0 || !strings.Contains(out, "alice@example.com") || !strings.Contains(out, "admin") {
		t.Errorf("no command: exit %d, %q", code, out)
	}
}
