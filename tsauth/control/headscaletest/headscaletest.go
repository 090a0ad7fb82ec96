// Package headscaletest runs a real headscale control server on loopback for
// tests: a temporary config and sqlite database, its embedded DERP over plain
// HTTP, the policy in database mode so the REST API can edit it, one user and an
// API key made with headscale's own CLI over its unix socket.
//
// It owns the headscale process of one test and nothing else. The binary comes
// from env THREES_HEADSCALE (`make headscale` builds it from tools/headscale); a
// test without it is skipped, or fails when env CI=true.
package headscaletest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"tailscale.com/envknob"

	"github.com/threes-dev/threes/internal/netnstest"
)

// User is the headscale user Start creates.
const User = "threes"

// Server is a running headscale.
type Server struct {
	// URL is its server_url: the control URL for clients and the API's base.
	URL string
	// APIKey is a fresh API key for the REST API.
	APIKey string
	// Dir holds the config, database, keys, socket and log.
	Dir string

	bin    string
	config string
	log    string
}

// Binary returns the headscale binary from env THREES_HEADSCALE, skipping t when
// it is not set or missing (failing instead under CI=true).
func Binary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("THREES_HEADSCALE")
	msg := ""
	if bin == "" {
		msg = "THREES_HEADSCALE is not set (make headscale builds bin/headscale)"
	} else if _, err := os.Stat(bin); err != nil {
		msg = fmt.Sprintf("THREES_HEADSCALE=%s: %v", bin, err)
	}
	if msg != "" {
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// SetClientEnv sets, for the rest of t, what in-process tsnet clients of a
// headscaletest server need: DERP over plain HTTP (the embedded DERP has no TLS)
// and no port mapping probes. It goes through envknob because tailscale reads
// these knobs once at start-up; t.Setenv alone would not reach them. Tests that
// use it must not be parallel.
func SetClientEnv(t testing.TB) {
	t.Helper()
	for k, v := range map[string]string{"TS_DEBUG_USE_DERP_HTTP": "true", "TS_DISABLE_PORTMAPPER": "true"} {
		envknob.SetenvForTest(t, k, v)
	}
}

// Start runs headscale on loopback until t ends, and returns once its API
// answers and the user and API key exist.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartOn(t, netip.IPv4Unspecified())
}

// StartOn is Start with the control server, its DERP relay and STUN on ip
// instead of loopback, for clients that are not on this host: guests on a
// test's bridge reach it at the bridge's own address. ip must be on an
// interface of the test's network namespace. The unspecified address means
// loopback.
func StartOn(t testing.TB, ip netip.Addr) *Server {
	t.Helper()
	netnstest.LoopbackUp(t)
	bin := Binary(t)
	if !ip.Is4() {
		t.Fatalf("headscaletest: StartOn(%v): want an IPv4 address", ip)
	}
	if ip.IsUnspecified() {
		ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	dir := t.TempDir()
	s := &Server{Dir: dir, bin: bin, config: filepath.Join(dir, "config.yaml"), log: filepath.Join(dir, "headscale.log")}

	port, metricsPort, grpcPort := freeTCPPort(t, ip), freeTCPPort(t, netip.Addr{}), freeTCPPort(t, netip.Addr{})
	stunPort := freeUDPPort(t, ip)
	s.URL = "http://" + netip.AddrPortFrom(ip, uint16(port)).String()
	cfg := fmt.Sprintf(configTemplate, s.URL, port, metricsPort, grpcPort, dir, stunPort, ip)
	if err := os.WriteFile(s.config, []byte(cfg), 0o600); err != nil {
		t.Fatalf("write headscale config: %v", err)
	}

	logf, err := os.Create(s.log)
	if err != nil {
		t.Fatalf("create headscale log: %v", err)
	}
	cmd := exec.Command(bin, "-c", s.config, "serve")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = dir
	// A test binary killed by its timeout runs no cleanup: the kernel ends
	// headscale with it, so no orphan keeps ports (or a test lock) held.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start headscale: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// Only the process started here, by its PID.
		_ = cmd.Process.Kill()
		<-exited
		logf.Close()
		if t.Failed() {
			t.Logf("headscale log (%s):\n%s", s.log, s.tailLog())
		}
	})

	if err := s.waitHealthy(exited); err != nil {
		t.Fatalf("headscale did not come up: %v\n%s", err, s.tailLog())
	}
	s.CLI(t, "users", "create", User)
	s.APIKey = strings.TrimSpace(s.CLI(t, "apikeys", "create", "--expiration", "24h"))
	if s.APIKey == "" {
		t.Fatal("headscale apikeys create printed no key")
	}
	return s
}

// CLI runs headscale's CLI against this server (over its unix socket) and returns
// its standard output.
func (s *Server) CLI(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, append([]string{"-c", s.config}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("headscale %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func (s *Server) waitHealthy(exited <-chan error) error {
	deadline := time.Now().Add(time.Minute)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("headscale exited: %v", err)
		default:
		}
		resp, err := client.Get(s.URL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				if _, err := os.Stat(filepath.Join(s.Dir, "headscale.sock")); err == nil {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return errors.New("no healthy answer within a minute")
		}
		time.Sleep(50 * time.Millisecond) // polling a process we cannot be notified by
	}
}

func (s *Server) tailLog() string {
	b, _ := os.ReadFile(s.log)
	if len(b) > 8<<10 {
		b = b[len(b)-8<<10:]
	}
	return string(b)
}

// freeTCPPort and freeUDPPort pick a free port on ip (loopback when ip is
// the zero Addr).
func freeTCPPort(t testing.TB, ip netip.Addr) int {
	t.Helper()
	l, err := net.Listen("tcp", hostPort(ip))
	if err != nil {
		t.Fatalf("pick a port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func freeUDPPort(t testing.TB, ip netip.Addr) int {
	t.Helper()
	c, err := net.ListenPacket("udp", hostPort(ip))
	if err != nil {
		t.Fatalf("pick a port: %v", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

func hostPort(ip netip.Addr) string {
	if !ip.IsValid() {
		ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return netip.AddrPortFrom(ip, 0).String()
}

// configTemplate keeps everything on loopback (or StartOn's address) and inside
// the test's directory:
// no DERP map download, no update check, no log upload.
const configTemplate = `server_url: %[1]s
listen_addr: %[7]s:%[2]d
metrics_listen_addr: 127.0.0.1:%[3]d
grpc_listen_addr: 127.0.0.1:%[4]d
grpc_allow_insecure: false
noise:
  private_key_path: %[5]s/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: test
    region_name: threes test
    verify_clients: true
    stun_listen_addr: %[7]s:%[6]d
    private_key_path: %[5]s/derp_server_private.key
    automatically_add_embedded_derp_region: true
    ipv4: %[7]s
  urls: []
  paths: []
  auto_update_enabled: false
disable_check_updates: true
database:
  type: sqlite
  sqlite:
    path: %[5]s/db.sqlite
    write_ahead_log: true
log:
  level: warn
  format: text
policy:
  mode: database
dns:
  magic_dns: false
  base_domain: threes.test
  override_local_dns: false
  nameservers:
    global: []
unix_socket: %[5]s/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
taildrop:
  enabled: false
`
