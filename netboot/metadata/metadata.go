// Package metadata serves each VM its own configuration over HTTP on the
// bridge's gateway address: threes v0.1's endpoints, a cloud-init
// NoCloud datasource, and the Tailscale auth key, once.
//
// Every request is tied to a VM by its source address, and only after the
// neighbour check agrees that the address is at the MAC the IPAM holds for
// it. The data comes from a Source the appliance implements over its
// database; this package stores nothing and does not talk to the database.
// Routes are listed in netboot/README.md.
package metadata

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/threes-dev/threes/netboot/ipam"
	"github.com/threes-dev/threes/netboot/neigh"
)

// ErrNotFound means the Source has no VM at the address.
var ErrNotFound = errors.New("instance not found")

// ErrAuthKeyTaken means the VM's auth key was handed out already.
var ErrAuthKeyTaken = errors.New("auth key already taken")

// KV is one of a VM's key/values.
type KV struct {
	Key   string
	Value string
	// Secret values are served only with the Metadata-Flavor header.
	Secret bool
}

// Instance is what the server knows about one VM.
type Instance struct {
	ID        string
	Hostname  string
	Script    string
	PublicKey string
	KVs       []KV
}

// Source is the appliance's database as the metadata server sees it.
type Source interface {
	// ByIP returns the VM holding ip, or ErrNotFound.
	ByIP(ctx context.Context, ip netip.Addr) (Instance, error)
	// TakeAuthKey returns the VM's Tailscale auth key the first time and
	// ErrAuthKeyTaken after.
	TakeAuthKey(ctx context.Context, vmID string) (string, error)
}

// Owners says which MAC holds an address; *ipam.IPAM implements it.
type Owners interface {
	// ByIP returns the allocation holding ip.
	ByIP(ip netip.Addr) (ipam.Allocation, bool)
}

// Verifier checks that ip is at mac on the wire; *neigh.Checker implements it.
type Verifier interface {
	// Verify returns nil when ip is at mac.
	Verify(ctx context.Context, ip netip.Addr, mac net.HardwareAddr) error
}

// Header names and values of the protocol.
const (
	// FlavorHeader must be sent, with FlavorValue, to read secrets: a
	// browser cannot add it without a CORS preflight this server never
	// approves, and URL-fetching SSRF cannot add it at all.
	FlavorHeader = "Metadata-Flavor"
	// FlavorValue is FlavorHeader's required value.
	FlavorValue = "threes"
	// SessionHeader carries a token from PUT /v1/session.
	SessionHeader = "X-Threes-Session"
	// SessionTTLHeader asks PUT /v1/session for a lifetime in seconds.
	SessionTTLHeader = "X-Threes-Session-TTL-Seconds"
	// MaxSessionTTL bounds a session token's lifetime.
	MaxSessionTTL = 6 * time.Hour
	// DefaultMaxConnsPerSource is Config.MaxConnsPerSource's default: far
	// more than cloud-init or an agent opens, far less than a flood.
	DefaultMaxConnsPerSource = 32
)

// Config configures a Server.
type Config struct {
	// Source provides the VMs' data.
	Source Source
	// IPAM says which MAC holds each address.
	IPAM Owners
	// ControlURL is the tailnet's control server, served to guests so they
	// join the same one (headscale, say); empty means Tailscale's default.
	// Not a secret: any guest may read it.
	ControlURL string
	// Neighbours checks the requester's MAC; nil turns the check off,
	// which only benchmarks should do.
	Neighbours Verifier
	// RequireSession makes every /v1 request carry a session token, as
	// EC2's IMDSv2 does; the token's reply leaves with IP TTL 1, so a
	// container or anything the VM routes for cannot get one. Off by
	// default: guests written for threes v0.1's protocol fetch
	// /v1/config without a session, and the flavor header already stops
	// URL-only SSRF. The cloud-init routes stay open: cloud-init's
	// NoCloud datasource cannot fetch a token, and they hold no secrets.
	RequireSession bool
	// MaxConnsPerSource bounds the connections one source address holds
	// open at once; DefaultMaxConnsPerSource when zero. Past it new ones
	// are closed at once, so one VM cannot exhaust the server's sockets.
	MaxConnsPerSource int
	// Log receives refusals; slog.Default when nil. Secrets never reach it.
	Log *slog.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// Server is the metadata HTTP handler.
type Server struct {
	cfg Config
	key [32]byte // signs session tokens; new at each start
	mux *http.ServeMux

	// Open connections per source address; an address leaves the map
	// with its last connection, so VMs that are gone leave nothing.
	connsMu sync.Mutex
	conns   map[netip.Addr]int
}

// New returns a Server for cfg.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil || cfg.IPAM == nil {
		return nil, errors.New("new metadata server: source and ipam are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxConnsPerSource <= 0 {
		cfg.MaxConnsPerSource = DefaultMaxConnsPerSource
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux(), conns: map[netip.Addr]int{}}
	if _, err := rand.Read(s.key[:]); err != nil {
		return nil, fmt.Errorf("new metadata server: session key: %w", err)
	}
	s.routes()
	return s, nil
}

type ctxKey int

const connKey ctxKey = iota

// Serve serves HTTP on ln until ctx is done.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		// The connection is kept so the session PUT can set its TTL.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey, c)
		},
		ErrorLog: slog.NewLogLogger(s.cfg.Log.Handler(), slog.LevelDebug),
	}
	stop := context.AfterFunc(ctx, func() { hs.Close() })
	defer stop()
	if err := hs.Serve(&capListener{Listener: ln, s: s}); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metadata on %s: %w", ln.Addr(), err)
	}
	return nil
}

// capListener closes, as soon as they are accepted, the connections of a
// source that already holds Config.MaxConnsPerSource open.
type capListener struct {
	net.Listener
	s *Server
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
		if err != nil {
			return c, nil // not TCP/IP: nothing to count by
		}
		ip := ap.Addr().Unmap()
		if !l.s.open(ip) {
			c.Close()
			continue
		}
		return &countedConn{Conn: c, release: sync.OnceFunc(func() { l.s.closed(ip) })}, nil
	}
}

// open counts a connection from ip, or reports false when ip holds the
// most it may; the first refusal in a row is logged.
func (s *Server) open(ip netip.Addr) bool {
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	n := s.conns[ip]
	if n >= s.cfg.MaxConnsPerSource {
		return false
	}
	s.conns[ip] = n + 1
	if n+1 == s.cfg.MaxConnsPerSource {
		s.cfg.Log.Warn("metadata connections capped", "from", ip.String(), "open", n+1)
	}
	return true
}

func (s *Server) closed(ip netip.Addr) {
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	if s.conns[ip] <= 1 {
		delete(s.conns, ip)
		return
	}
	s.conns[ip]--
}

// countedConn gives its slot back once, when closed.
type countedConn struct {
	net.Conn
	release func()
}

func (c *countedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// SyscallConn reaches the socket under the count, for the session's TTL.
func (c *countedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("connection has no socket")
	}
	return sc.SyscallConn()
}

// caller is a request that passed the checks, with its VM.
type caller struct {
	ip       netip.Addr
	inst     Instance
	flavored bool
}

type handler func(w http.ResponseWriter, r *http.Request, c *caller)

func (s *Server) routes() {
	// Secret routes need the flavor header; the rest do not. The config
	// is open but carries the token only with the header.
	s.handle("GET /v1/config", false, s.config)
	s.handle("GET /v1/hostname", false, text(func(i Instance) string { return i.Hostname }))
	s.handle("GET /v1/script", false, text(func(i Instance) string { return i.Script }))
	s.handle("GET /v1/public_key", false, text(func(i Instance) string { return i.PublicKey }))
	s.handle("GET /v1/control_url", false, text(func(Instance) string { return s.cfg.ControlURL }))
	s.handle("GET /v1/token", true, s.token)
	s.handle("GET /v1/kv", false, s.kvs)
	// Keys may hold "/": the rest of the path is the key.
	s.handle("GET /v1/kv/{key...}", false, s.kv)
	s.handle("GET /cloud-init/meta-data", false, s.metaData)
	s.handle("GET /cloud-init/user-data", false, s.userData)
	s.handle("GET /cloud-init/vendor-data", false, s.vendorData)
	s.mux.HandleFunc("PUT /v1/session", s.session)
	s.handle("GET /{$}", false, func(w http.ResponseWriter, r *http.Request, c *caller) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, "v1/\ncloud-init/\n")
	})
}

// ServeHTTP refuses forwarded requests and then routes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// A proxy inside the VM (or anywhere) is not the VM: the source address
	// would not be the caller's, so refuse rather than trust either. An
	// empty header is still a proxy's.
	for _, h := range []string{"X-Forwarded-For", "Forwarded"} {
		if _, ok := r.Header[h]; ok {
			s.refuse(w, r, netip.Addr{}, nil, "forwarded request ("+h+" header)")
			return
		}
	}
	s.mux.ServeHTTP(w, r)
}

func (s *Server) refuse(w http.ResponseWriter, r *http.Request, ip netip.Addr, err error, why string) {
	args := []any{"from", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "reason", why}
	if ip.IsValid() {
		args[1] = ip.String()
	}
	var me *neigh.MismatchError
	var pe *neigh.PortError
	if errors.As(err, &me) {
		args = append(args, "want_mac", me.Want.String(), "seen_mac", me.Got.String(), "by_arp", me.Probed)
	} else if errors.As(err, &pe) {
		args = append(args, "mac", pe.MAC.String(), "want_port", pe.Want, "seen_port", pe.Got)
	} else if err != nil {
		args = append(args, "err", err.Error())
	}
	s.cfg.Log.Warn("metadata request refused", args...)
	http.Error(w, "forbidden", http.StatusForbidden)
}

func (s *Server) handle(pattern string, secret bool, h handler) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		c, ok := s.check(w, r)
		if !ok {
			return
		}
		if secret && !c.flavored {
			s.refuse(w, r, c.ip, nil, "secret route without "+FlavorHeader+" header")
			return
		}
		if s.cfg.RequireSession && strings.HasPrefix(r.URL.Path, "/v1/") {
			if err := s.checkSession(r.Header.Get(SessionHeader), c.ip); err != nil {
				s.cfg.Log.Warn("metadata request refused", "from", c.ip.String(), "path", r.URL.Path, "reason", err.Error())
				http.Error(w, "session token required", http.StatusUnauthorized)
				return
			}
		}
		w.Header().Set("Cache-Control", "no-store")
		h(w, r, c)
	})
}

// check ties the request to a VM: source address known to the IPAM, at
// the IPAM's MAC on the wire, and known to the Source.
func (s *Server) check(w http.ResponseWriter, r *http.Request) (*caller, bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		s.refuse(w, r, netip.Addr{}, err, "unparsable source address")
		return nil, false
	}
	ip := ap.Addr().Unmap()
	a, ok := s.cfg.IPAM.ByIP(ip)
	if !ok || a.Pending {
		s.refuse(w, r, ip, nil, "address not allocated")
		return nil, false
	}
	if s.cfg.Neighbours != nil {
		if err := s.cfg.Neighbours.Verify(r.Context(), ip, a.MAC); err != nil {
			s.refuse(w, r, ip, err, "neighbour check failed")
			return nil, false
		}
	}
	inst, err := s.cfg.Source.ByIP(r.Context(), ip)
	if errors.Is(err, ErrNotFound) {
		http.Error(w, "not found", http.StatusNotFound)
		return nil, false
	}
	if err != nil && r.Context().Err() != nil {
		// The client hung up and cancelled the lookup: nothing failed here.
		s.cfg.Log.Debug("metadata client went away", "from", ip.String(), "err", err.Error())
		return nil, false
	}
	if err != nil {
		s.cfg.Log.Error("metadata source failed", "from", ip.String(), "err", err.Error())
		http.Error(w, "internal error", http.StatusInternalServerError)
		return nil, false
	}
	return &caller{ip: ip, inst: inst, flavored: r.Header.Get(FlavorHeader) == FlavorValue}, true
}

func text(f func(Instance) string) handler {
	return func(w http.ResponseWriter, r *http.Request, c *caller) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, f(c.inst))
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// takeKey returns the auth key, "" when taken, or false after writing an error.
func (s *Server) takeKey(w http.ResponseWriter, r *http.Request, c *caller) (string, bool) {
	k, err := s.cfg.Source.TakeAuthKey(r.Context(), c.inst.ID)
	if errors.Is(err, ErrAuthKeyTaken) {
		return "", true
	}
	if err != nil {
		s.cfg.Log.Error("metadata take auth key failed", "vm", c.inst.ID, "err", err.Error())
		http.Error(w, "internal error", http.StatusInternalServerError)
		return "", false
	}
	s.cfg.Log.Info("metadata auth key handed out", "vm", c.inst.ID, "to", c.ip.String())
	return k, true
}

// config is threes v0.1's JSON, field names kept; the token is there the
// first time only, and only for a request with the flavor header.
func (s *Server) config(w http.ResponseWriter, r *http.Request, c *caller) {
	var k string
	if c.flavored {
		var ok bool
		if k, ok = s.takeKey(w, r, c); !ok {
			return
		}
	}
	writeJSON(w, struct {
		Hostname   string `json:"hostname"`
		Token      string `json:"token"`
		Script     string `json:"script"`
		PublicKey  string `json:"public_key"`
		ControlURL string `json:"control_url"`
	}{c.inst.Hostname, k, c.inst.Script, c.inst.PublicKey, s.cfg.ControlURL})
}

func (s *Server) token(w http.ResponseWriter, r *http.Request, c *caller) {
	k, ok := s.takeKey(w, r, c)
	if !ok {
		return
	}
	if k == "" {
		http.Error(w, "auth key already handed out", http.StatusGone)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprint(w, k)
}

// kvs returns every key/value the caller may see: secret ones only with
// the flavor header.
func (s *Server) kvs(w http.ResponseWriter, r *http.Request, c *caller) {
	m := map[string]string{}
	for _, kv := range c.inst.KVs {
		if !kv.Secret || c.flavored {
			m[kv.Key] = kv.Value
		}
	}
	writeJSON(w, m)
}

func (s *Server) kv(w http.ResponseWriter, r *http.Request, c *caller) {
	key := r.PathValue("key")
	for _, kv := range c.inst.KVs {
		if kv.Key != key {
			continue
		}
		if kv.Secret && !c.flavored {
			s.refuse(w, r, c.ip, nil, "secret key/value without "+FlavorHeader+" header")
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, kv.Value)
		return
	}
	http.Error(w, "no such key", http.StatusNotFound)
}

// NoCloudURL is the seed URL of the cloud-init NoCloud datasource a Server
// listening at addr serves (meta-data, user-data and vendor-data under it),
// with the trailing slash cloud-init needs; port 80 is left out.
func NoCloudURL(addr netip.AddrPort) *url.URL {
	u := baseURL(addr)
	u.Path = "/cloud-init/"
	return u
}

// baseURL is the root of a Server listening at addr; port 80 is left out.
func baseURL(addr netip.AddrPort) *url.URL {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	host := addr.String()
	if addr.Port() == 80 {
		host = strings.TrimSuffix(host, ":80")
	}
	return &url.URL{Scheme: "http", Host: host}
}

// yamlString quotes s for YAML as JSON does: a JSON string is valid YAML.
func yamlString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func (s *Server) metaData(w http.ResponseWriter, r *http.Request, c *caller) {
	w.Header().Set("Content-Type", "text/yaml; charset=utf-8")
	fmt.Fprintf(w, "instance-id: %s\nlocal-hostname: %s\n", yamlString(c.inst.ID), yamlString(c.inst.Hostname))
	if c.inst.PublicKey != "" {
		fmt.Fprintf(w, "public-keys:\n  - %s\n", yamlString(c.inst.PublicKey))
	}
}

// userData is the VM's startup script. cloud-init runs a script starting
// with #! and reads #cloud-config (and its other formats) as such; anything
// else would be ignored, so it is wrapped to run under /bin/sh.
func (s *Server) userData(w http.ResponseWriter, r *http.Request, c *caller) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	sc := c.inst.Script
	switch {
	case sc == "":
		fmt.Fprint(w, "#cloud-config\n{}\n")
	case strings.HasPrefix(sc, "#"):
		fmt.Fprint(w, sc)
	default:
		fmt.Fprint(w, "#!/bin/sh\n"+sc)
	}
}

// vendorBoundary separates vendor-data's parts; no part can hold it (the
// only text from elsewhere is a hostname and a URL, both quoted on one line).
const vendorBoundary = "==threes-vendor-data=="

// vendorData is threes' own part of the guest's configuration, apart from
// the user's script (user-data): the hostname, and a script that brings
// Tailscale up when the image has it. It is MIME multipart so the script is
// a vendor script of its own: cloud-init runs those whatever the user-data
// holds, where a runcmd here would be replaced by the user's own runcmd.
func (s *Server) vendorData(w http.ResponseWriter, r *http.Request, c *caller) {
	local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	ap, err := netip.ParseAddrPort(fmt.Sprint(local))
	if !ok || err != nil {
		s.cfg.Log.Error("metadata vendor-data: no server address", "from", c.ip.String())
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "multipart/mixed; boundary=\""+vendorBoundary+"\"")
	fmt.Fprintf(w, "Content-Type: multipart/mixed; boundary=\"%s\"\nMIME-Version: 1.0\n\n", vendorBoundary)
	fmt.Fprintf(w, "--%s\nContent-Type: text/cloud-config; charset=\"utf-8\"\n\n", vendorBoundary)
	fmt.Fprintf(w, "#cloud-config\npreserve_hostname: false\nhostname: %s\n\n", yamlString(c.inst.Hostname))
	fmt.Fprintf(w, "--%s\nContent-Type: text/x-shellscript; charset=\"utf-8\"\n\n", vendorBoundary)
	fmt.Fprint(w, s.tailscaleUp(ap, c.inst.Hostname))
	fmt.Fprintf(w, "\n--%s--\n", vendorBoundary)
}

// shellQuote quotes v as one word for a POSIX shell.
func shellQuote(v string) string {
	return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}

// tailscaleUp is the vendor script that joins the tailnet: the one-time key
// goes from this server into a file only root can read, which tailscale
// reads itself (file:), so the key is on no command line and in no log;
// the file is removed however the script ends.
func (s *Server) tailscaleUp(server netip.AddrPort, hostname string) string {
	login := ""
	if s.cfg.ControlURL != "" {
		login = " --login-server=" + shellQuote(s.cfg.ControlURL)
	}
	session := "0"
	if s.cfg.RequireSession {
		session = "1"
	}
	return `#!/bin/sh
# threes: bring Tailscale up with this VM's one-time auth key, if the image
# has Tailscale. The key never reaches a command line or a log.
say() { echo "threes: $*" >&2; }
if ! command -v tailscale >/dev/null 2>&1; then
	say "no tailscale in this image: not joining the tailnet"
	exit 0
fi
md=` + shellQuote(baseURL(server).String()) + `
dir=$(umask 077 && mktemp -d /run/threes-tailscale.XXXXXX) || exit 1
trap 'rm -rf "$dir"' EXIT
trap 'exit 1' HUP INT TERM
umask 077
printf '%s
' '` + FlavorHeader + `: ` + FlavorValue + `' >"$dir/headers"
if [ ` + session + ` = 1 ]; then
	# The server wants a session token first (IMDSv2-style).
	tok=$(curl -fsS --max-time 10 -X PUT -H '` + SessionTTLHeader + `: 120' "$md/v1/session") || { say "no metadata session"; exit 1; }
	printf '%s: %s
' '` + SessionHeader + `' "$tok" >>"$dir/headers"
	tok=
fi
if command -v curl >/dev/null 2>&1; then
	code=$(curl -sS --max-time 10 -H "@$dir/headers" -o "$dir/key" -w '%{http_code}' "$md/v1/token")
elif [ ` + session + ` = 0 ]; then
	code=200
	wget -q -O "$dir/key" --header='` + FlavorHeader + `: ` + FlavorValue + `' "$md/v1/token" || code=failed
else
	code="no curl"
fi
case $code in
200) ;;
410) say "auth key already taken: not joining the tailnet"; exit 1 ;;
*) say "fetching the auth key failed ($code)"; exit 1 ;;
esac
i=0
until tailscale version --daemon >/dev/null 2>&1; do
	i=$((i + 1))
	if [ $i -gt 60 ]; then
		say "tailscaled is not running: not joining the tailnet"
		exit 1
	fi
	sleep 1
done
# Bounded, so cloud-init's final stage ends even when the control server
# cannot be reached; tailscaled itself goes on trying with the key.
tailscale up --timeout=2m --auth-key="file:$dir/key" --hostname=` + shellQuote(hostname) + login + ` || { say "tailscale up failed"; exit 1; }
say "on the tailnet"
`
}

// session hands out a token bound to the caller's address, as IMDSv2's PUT
// does; the reply leaves with IP TTL 1 so it cannot be routed beyond the VM.
func (s *Server) session(w http.ResponseWriter, r *http.Request) {
	c, ok := s.check(w, r)
	if !ok {
		return
	}
	ttl, err := strconv.Atoi(r.Header.Get(SessionTTLHeader))
	if err != nil || ttl < 1 || time.Duration(ttl)*time.Second > MaxSessionTTL {
		http.Error(w, fmt.Sprintf("%s must be 1 to %d", SessionTTLHeader, int(MaxSessionTTL.Seconds())), http.StatusBadRequest)
		return
	}
	if conn, ok := r.Context().Value(connKey).(net.Conn); ok {
		if sc, ok := conn.(syscall.Conn); ok {
			if raw, err := sc.SyscallConn(); err == nil {
				raw.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, 1) })
			}
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, s.newSession(c.ip, s.cfg.Now().Add(time.Duration(ttl)*time.Second)))
}

func (s *Server) sign(ip netip.Addr, exp int64) []byte {
	m := hmac.New(sha256.New, s.key[:])
	var b [12]byte
	binary.BigEndian.PutUint64(b[:8], uint64(exp))
	a := ip.As4()
	copy(b[8:], a[:])
	m.Write(b[:])
	return m.Sum(nil)[:16]
}

func (s *Server) newSession(ip netip.Addr, exp time.Time) string {
	var b [24]byte
	binary.BigEndian.PutUint64(b[:8], uint64(exp.Unix()))
	copy(b[8:], s.sign(ip, exp.Unix()))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (s *Server) checkSession(tok string, ip netip.Addr) error {
	if tok == "" {
		return errors.New("no session token")
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(b) != 24 {
		return errors.New("malformed session token")
	}
	exp := int64(binary.BigEndian.Uint64(b[:8]))
	if !hmac.Equal(b[8:], s.sign(ip, exp)) {
		return errors.New("session token not issued to this address")
	}
	if s.cfg.Now().Unix() >= exp {
		return errors.New("session token expired")
	}
	return nil
}
