package appliance_test

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/threes-dev/threes/appliance/threestest"
	"github.com/threes-dev/threes/hv"
	"github.com/threes-dev/threes/hv/hvtest"
	"github.com/threes-dev/threes/internal/netnstest"
	threesv1 "github.com/threes-dev/threes/proto/threes/v1"
	"github.com/threes-dev/threes/tsauth/tailnettest"
)

// BenchmarkScale is issue 15's run: one `threes serve` process on libvirt's test
// driver, THREES_SCALE_VMS VMs (default 10,000) created through the local socket
// by 6 workers, then `vm all`, the idle CPU of serve and libvirtd, the time from a
// restart to serving, and metadata requests/s through the appliance beside the
// in-memory source of cmd/threes-dhcpbench on an identical bridge and MAC list.
// It runs once whatever -benchtime says, and prints a table; `make bench-scale`.
func BenchmarkScale(b *testing.B) {
	n, _ := strconv.Atoi(os.Getenv("THREES_SCALE_VMS"))
	if n <= 0 {
		b.Skip("THREES_SCALE_VMS not set: `make bench-scale` runs this")
	}
	netnstest.Require(b, "wrk")
	// Long enough to hold a pass that asks libvirt for every domain (every
	// tenth pass of 30 s), not only passes that take them from its events.
	idleFor := 310 * time.Second
	if d, err := time.ParseDuration(os.Getenv("THREES_SCALE_IDLE")); err == nil {
		idleFor = d
	}
	bin := os.Getenv("THREES_BIN")
	if bin == "" {
		b.Fatal("THREES_BIN must name a built threes")
	}
	ctx := context.Background()
	dir := b.TempDir()
	host := fmt.Sprintf("scale-%d", os.Getpid())
	threestest.SeedImages(b, dir, "base")
	control := tailnettest.Start(b).ControlURL
	// A connection of the benchmark's own keeps the test driver's domains across
	// the restart (it forgets them when its last connection closes).
	witness, err := hv.Open(ctx, hv.Config{URI: hvtest.URI, Socket: hvtest.Socket, Owner: "threes/" + host})
	if err != nil {
		b.Fatal(err)
	}
	defer witness.Close()

	// Two identical bridges in namespaces of their own: the appliance's, and the
	// in-memory source's. A guest namespace on each has the same MAC and IP.
	brNS := netnstest.NewNS(b, "scbr")
	brNS.Bridge(b, "br-sc", "10.10.0.1/16")
	memNS := netnstest.NewNS(b, "scmem")
	memNS.Bridge(b, "br-sc", "10.10.0.1/16")

	logLevel := cmp.Or(os.Getenv("THREES_SCALE_LOG"), "warn")
	sock := filepath.Join(dir, "threes.sock")
	logFile := filepath.Join(dir, "serve.log")
	serve := func() *exec.Cmd {
		cmd := exec.Command(bin, "serve", "--state-dir", dir, "--socket", sock, "--hostname", host,
			"--libvirt-uri", hvtest.URI, "--control-url", control, "--log-level", logLevel,
			"--interface", "br-sc", "--bridge-netns", brNS.Name, "--cidr", "10.10.0.0/16",
			// Thousands of teeny VMs promise far more disk than the host has; on
			// the test driver no guest ever writes to its disk.
			"--disk-overcommit", "0",
			// Nor any CPU or memory: room for every VM the run makes.
			"--vcpus", fmt.Sprint(n), "--memory-mib", fmt.Sprint(n*512))
		cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true", "TS_DISABLE_PORTMAPPER=1")
		f, err := os.OpenFile(logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			b.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = f, f
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		f.Close()
		return cmd
	}
	stop := func(cmd *exec.Cmd) {
		// Only the process started here, by its PID.
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			<-done
		}
	}
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	api := threesv1.NewThreesClient(conn)
	waitAPI := func(cmd *exec.Cmd) {
		deadline := time.Now().Add(2 * time.Minute)
		for {
			c, cancel := context.WithTimeout(ctx, time.Second)
			_, err := api.WhoAmI(c, &threesv1.WhoAmIRequest{})
			cancel()
			if err == nil {
				return
			}
			if time.Now().After(deadline) || cmd.ProcessState != nil {
				log, _ := os.ReadFile(logFile)
				b.Fatalf("serve not answering: %v\n%s", err, log)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	cmd := serve()
	defer func() { stop(cmd) }()
	waitAPI(cmd)
	if _, err := api.CreateNetwork(ctx, &threesv1.NetworkRequest{Name: "lab"}); err != nil {
		b.Fatal(err)
	}

	// Creates, 6 workers, timed per thousand.
	var next atomic.Int64
	done := make([]time.Time, n)
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for range 6 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				_, err := api.Create(ctx, &threesv1.CreateRequest{Name: fmt.Sprintf("vm%05d", i), Network: "lab", Image: "base", Type: threesv1.VMType_VM_TYPE_TEENY})
				if err != nil {
					b.Errorf("create vm%05d: %v", i, err)
					failed.Add(1)
				}
				done[i] = time.Now()
			}
		})
	}
	wg.Wait()
	total := time.Since(start)
	slices.SortFunc(done, func(x, y time.Time) int { return x.Compare(y) })
	step := 1000
	if n < 5000 {
		step = max(n/5, 1)
	}
	var perStep []string
	prev := start
	for i := step - 1; i < n; i += step {
		perStep = append(perStep, fmt.Sprintf("%.1f", float64(step)/done[i].Sub(prev).Seconds()))
		prev = done[i]
	}

	// `vm all`, text and JSON, through the CLI.
	vmAll := func(args ...string) time.Duration {
		best := time.Duration(1 << 62)
		for range 3 {
			c := exec.Command(bin, append([]string{"vm", "all", "--socket", sock}, args...)...)
			t0 := time.Now()
			out, err := c.Output()
			if err != nil {
				b.Fatalf("vm all: %v", err)
			}
			best = min(best, time.Since(t0))
			if lines := strings.Count(string(out), "\n"); len(args) == 0 && lines < n {
				b.Fatalf("vm all printed %d lines for %d vms", lines, n)
			}
		}
		return best
	}
	allText, allJSON := vmAll(), vmAll("-o", "json")

	// Idle: nothing asked of either for idleFor.
	time.Sleep(5 * time.Second)
	lvPid := libvirtdPID(b)
	s0, l0, t0 := cpuTicks(b, cmd.Process.Pid), cpuTicks(b, lvPid), time.Now()
	time.Sleep(idleFor)
	s1, l1, t1 := cpuTicks(b, cmd.Process.Pid), cpuTicks(b, lvPid), time.Now()
	idle := t1.Sub(t0)
	share := func(a, z int64) float64 { return 100 * float64(z-a) / 100 / idle.Seconds() } // 100 ticks/s
	idleServe, idleLibvirtd := share(s0, s1), share(l0, l1)

	// A guest on each bridge: the appliance's first VM's MAC and address.
	vms := allVMs(b, api)
	slices.SortFunc(vms, func(x, y *threesv1.VM) int {
		return addrNum(x.GetManagementIp()) - addrNum(y.GetManagementIp())
	})
	guestMAC, guestIP := vms[0].GetMac(), vms[0].GetManagementIp()
	hw, _ := net.ParseMAC(guestMAC)
	guest := brNS.Plug(b, "br-sc", "scvm", hw, guestIP+"/16")
	memGuest := memNS.Plug(b, "br-sc", "scmv", hw, guestIP+"/16")
	// The in-memory source's IPAM, loaded in address order, hands out the same
	// addresses to the same MACs as the appliance did.
	macFile := filepath.Join(dir, "macs")
	var macs strings.Builder
	for _, vm := range vms {
		fmt.Fprintln(&macs, vm.GetMac())
	}
	if err := os.WriteFile(macFile, []byte(macs.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	benchBin := filepath.Join(dir, "threes-dhcpbench")
	if out, err := exec.Command("go", "build", "-o", benchBin, "github.com/threes-dev/threes/cmd/threes-dhcpbench").CombinedOutput(); err != nil {
		b.Fatalf("build threes-dhcpbench: %v\n%s", err, out)
	}
	mem := memNS.Command(benchBin, "-i", "br-sc", "-macs", macFile, "-metadata", "10.10.0.1:80", "-allocs-out", filepath.Join(dir, "allocs"))
	if err := mem.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { mem.Process.Kill(); mem.Wait() }()
	waitHostname(b, memGuest, vms[0].GetName(), "")
	waitHostname(b, guest, vms[0].GetName(), vms[0].GetName())
	// Alternate, best of three each, as bench/netboot/run.sh does.
	var appRPS, memRPS float64
	for range 3 {
		appRPS = max(appRPS, wrk(b, guest))
		memRPS = max(memRPS, wrk(b, memGuest))
	}

	// Restart: stop serve, start it, time until the socket, DHCP's socket and the
	// metadata server answer.
	stop(cmd)
	t0 = time.Now()
	cmd = serve()
	waitAPI(cmd)
	toAPI := time.Since(t0)
	waitHostname(b, guest, vms[0].GetName(), vms[0].GetName())
	toMeta := time.Since(t0)
	if logLevel != "warn" {
		log, _ := os.ReadFile(logFile)
		b.Logf("serve's log:\n%s", log)
	}

	rows := [][2]string{
		{"VMs created (test driver, 6 workers over the socket)", fmt.Sprintf("%d in %.0f s, %d failed", n, total.Seconds(), failed.Load())},
		{fmt.Sprintf("creates/s by %d", step), strings.Join(perStep, ", ")},
		{"`vm all` text / JSON (CLI, best of 3)", fmt.Sprintf("%.2f s / %.2f s", allText.Seconds(), allJSON.Seconds())},
		{fmt.Sprintf("idle CPU over %.0f s: serve / libvirtd", idle.Seconds()), fmt.Sprintf("%.1f%% / %.1f%% of a core", idleServe, idleLibvirtd)},
		{"restart to API answering / to metadata answering", fmt.Sprintf("%.2f s / %.2f s", toAPI.Seconds(), toMeta.Seconds())},
		{"metadata /v1/hostname req/s: appliance / in-memory source (wrk -t2 -c32, best of 3)", fmt.Sprintf("%.0f / %.0f = %.2fx", appRPS, memRPS, appRPS/memRPS)},
	}
	fmt.Println("\n| what | measured |\n|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %s |\n", r[0], r[1])
	}
	b.ReportMetric(appRPS/memRPS, "metadata-ratio")
}

func allVMs(b *testing.B, api threesv1.ThreesClient) []*threesv1.VM {
	s, err := api.All(context.Background(), &threesv1.AllRequest{})
	if err != nil {
		b.Fatal(err)
	}
	var out []*threesv1.VM
	for {
		vm, err := s.Recv()
		if err != nil {
			return out
		}
		out = append(out, vm)
	}
}

func addrNum(ip string) int {
	var a, b, c, d int
	fmt.Sscanf(ip, "%d.%d.%d.%d", &a, &b, &c, &d)
	return a<<24 | b<<16 | c<<8 | d
}

// waitHostname polls the metadata server from the guest namespace until it
// answers 200 (with want as the body, unless want is empty).
func waitHostname(b *testing.B, guest *netnstest.NS, name, want string) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		body, code, err := getFrom(guest, "http://10.10.0.1/v1/hostname")
		if err == nil && code == 200 && (want == "" || strings.TrimSpace(body) == want) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("metadata for %s: %d %q %v", name, code, body, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func getFrom(ns *netnstest.NS, url string) (string, int, error) {
	var conn net.Conn
	if err := ns.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", "10.10.0.1:80", time.Second)
		return err
	}); err != nil {
		return "", 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	req, _ := http.NewRequest("GET", url, nil)
	if err := req.Write(conn); err != nil {
		return "", 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return "", 0, err
	}
	var body strings.Builder
	bufio.NewReader(resp.Body).WriteTo(&body)
	return body.String(), resp.StatusCode, nil
}

var wrkRPS = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

func wrk(b *testing.B, guest *netnstest.NS) float64 {
	out, err := guest.Command("wrk", "-t2", "-c32", "-d10s", "http://10.10.0.1/v1/hostname").CombinedOutput()
	if err != nil {
		b.Fatalf("wrk: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "Non-2xx") {
		b.Fatalf("wrk saw errors:\n%s", out)
	}
	m := wrkRPS.FindSubmatch(out)
	if m == nil {
		b.Fatalf("wrk output:\n%s", out)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

func libvirtdPID(b *testing.B) int {
	raw, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		b.Fatalf("libvirtd pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		b.Fatalf("libvirtd pid %q: %v", raw, err)
	}
	return pid
}

// cpuTicks returns the user plus system time of pid in clock ticks (100 per second).
func cpuTicks(b *testing.B, pid int) int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}
