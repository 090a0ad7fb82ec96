package appliance_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/control"
	"github.com/threes-dev/threes/tsauth/control/headscaletest"
	"github.com/threes-dev/threes/tsauth/policy"
)

// cloudImageDir is the Debian cloud image scripts/mkcloudimage builds:
// $THREES_CLOUDIMAGE, else bin/cloudimage (make cloudimage).
func cloudImageDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("THREES_CLOUDIMAGE")
	if dir == "" {
		dir = filepath.Join("..", "bin", "cloudimage")
	}
	if _, err := os.Stat(filepath.Join(dir, "disk.qcow2")); err != nil {
		hvtest.Skip(t, "no Debian cloud image (make cloudimage, or THREES_CLOUDIMAGE): %v", err)
	}
	return dir
}

// TestCloudImageOnQEMU: a Debian 12 image with systemd and cloud-init as
// Debian ships them boots under the appliance on QEMU, and cloud-init (a
// client nobody here wrote) finds threes' NoCloud datasource from the SMBIOS
// serial and applies it: the hostname, the SSH key for Debian's default
// user, threes' vendor-data, whose script brings the image's Tailscale up
// with the VM's one-time key on headscale (the control server the appliance
// uses, on the bridge's address), and the user's script as user-data,
// example/startup, which creates the user threes. The test logs in over SSH
// as both users with the key, and the appliance's node sees the VM as a peer
// with its network's tag.
func TestCloudImageOnQEMU(t *testing.T) {
	imgDir := cloudImageDir(t)
	startup, err := os.ReadFile("../example/startup")
	if err != nil {
		t.Fatal(err)
	}
	q := hvtest.OpenQEMU(t, hv.Config{StopTimeout: 2 * time.Minute})
	const gw = "10.78.0.1"
	if out, err := exec.Command("ip", "addr", "add", gw+"/24", "dev", q.Bridge).CombinedOutput(); err != nil {
		t.Fatalf("address the bridge: %v %s", err, out)
	}
	hs := headscaletest.StartOn(t, netip.MustParseAddr(gw))
	headscaletest.SetClientEnv(t)
	hs.SetPolicy(t, operatorPolicy)
	plane, err := control.NewHeadscale(control.HeadscaleConfig{
		URL: hs.URL, APIKey: control.NewSecret(hs.APIKey),
		Policy: policy.Options{OwnerTag: "tag:threes", Admins: []string{"threes@"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	a, err := appliance.Start(ctx, appliance.Options{
		StateDir:   q.Dir,
		ControlURL: hs.URL,
		AuthKey:    hs.PreauthKey(t, "tag:threes"),
		OwnerTag:   "tag:threes",
		Socket:     filepath.Join(q.Dir, "threes.sock"),
		CIDR:       "10.78.0.0/24",
		Bridge:     q.Bridge,
		Hypervisor: q.H,
		Plane:      plane,
		Logger:     slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		TSLogf:     func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if _, err := a.Tailnet().Up(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix:"+filepath.Join(q.Dir, "threes.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := threesv1.NewThreesClient(conn)

	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}

	uploadImage(t, ctx, c, "debian", imgDir)
	must[*threesv1.Network](t)(c.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}))
	vm := must[*threesv1.VM](t)(c.Create(ctx, &threesv1.CreateRequest{Name: "cloud1", Network: "lab", Image: "debian",
		Type: threesv1.VMType_VM_TYPE_SMALL, PublicKey: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub))) + " test@threes",
		Script: string(startup)}))
	con := hvtest.WatchConsole(t, apiConsole(t, ctx, c, vm.GetId()))
	defer func() {
		if t.Failed() {
			t.Logf("console:\n%s", con)
		}
	}()

	// On the console: the user's script ran (cloud-init's last stage),
	// after threes' vendor script, and cloud-init names the datasource.
	con.WaitFor(t, "example/startup: created user threes", 8*time.Minute)
	con.WaitFor(t, "example/startup: threes logs in with the VM's SSH key", time.Minute)
	con.WaitFor(t, "threes: on the tailnet", time.Second)
	if strings.Contains(con.String(), "tskey") || strings.Contains(con.String(), "hskey") {
		t.Errorf("an auth key reached the console")
	}
	// Found from the SMBIOS serial and the kernel command line alike.
	con.WaitFor(t, "Datasource DataSourceNoCloudNet [seed=dmi,cmdline,http://10.78.0.1/cloud-init/][dsmode=net]", 2*time.Minute)

	// Over SSH with the VM's key: Debian's default user (cloud-init's
	// public-keys) and threes (the startup script); the hostname is threes'.
	for _, user := range []string{"debian", "threes"} {
		out := sshRun(t, net.JoinHostPort(vm.GetManagementIp(), "22"), user, signer, "id -un; hostname; sudo -n true && echo sudo-ok")
		if want := user + "\ncloud1\nsudo-ok\n"; out != want {
			t.Errorf("ssh %s@cloud1: %q, want %q", user, out, want)
		}
	}

	// On the tailnet as cloud1, with its network's tag, as the appliance's
	// own node sees it.
	out := sshRun(t, net.JoinHostPort(vm.GetManagementIp(), "22"), "debian", signer, "sudo -n tailscale ip -4")
	ip, err := netip.ParseAddr(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("tailscale ip -4 in the guest: %q", out)
	}
	lc, err := a.Tailnet().LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		who, err := lc.WhoIs(ctx, ip.String())
		if err == nil {
			if !slices.Contains(who.Node.Tags, "tag:threes-lab") || !strings.HasPrefix(who.Node.ComputedName, "cloud1") {
				t.Errorf("the appliance sees %s as %s with tags %v, want cloud1 with tag:threes-lab", ip, who.Node.ComputedName, who.Node.Tags)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the appliance does not see the guest at %v: %v", ip, err)
		}
	}
}

// sshRun runs cmd on addr as user with signer, trying again while sshd is
// still starting.
func sshRun(t *testing.T, addr, user string, signer ssh.Signer, cmd string) string {
	t.Helper()
	cfg := &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: ssh.InsecureIgnoreHostKey(), // a throwaway VM's new host key
		Timeout:         20 * time.Second,
	}
	var last error
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(2 * time.Second) {
		cl, err := ssh.Dial("tcp", addr, cfg)
		if err != nil {
			last = err
			continue
		}
		defer cl.Close()
		s, err := cl.NewSession()
		if err != nil {
			t.Fatalf("ssh %s@%s session: %v", user, addr, err)
		}
		defer s.Close()
		// Standard output only: sudo warns on stderr that it cannot
		// resolve the VM's new hostname (Debian's cloud-init leaves
		// /etc/hosts alone).
		out, err := s.Output(cmd)
		if err != nil {
			t.Errorf("ssh %s@%s %q: %v", user, addr, cmd, err)
		}
		return string(out)
	}
	t.Fatalf("ssh %s@%s: %v", user, addr, last)
	return ""
}
