package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/threes-dev/threes/tsauth/policy"
)

// HeadscaleConfig configures the backend for a self-hosted headscale.
type HeadscaleConfig struct {
	// URL is headscale's server_url, e.g. https://headscale.example.com.
	URL string
	// APIKey is a headscale API key (`headscale apikeys create`).
	APIKey Secret
	// Policy says how networks are written; Policy.OwnerTag is required. Admins
	// defaults to ["autogroup:member"]: headscale has no admin role, and its users
	// exist only because the operator created them.
	Policy policy.Options
	// Transport carries the HTTP requests (default http.DefaultTransport).
	Transport http.RoundTripper
	// Retry governs retries on 429, 502, 503 and 504.
	Retry Retry
	// Now is the clock key expiry is computed from (default time.Now).
	Now func() time.Time
}

// Headscale is the Plane of a headscale server, driven through its REST API
// (/api/v1, bearer API key). The server's policy must be in database mode
// (policy.mode: database) for threes to edit it.
type Headscale struct {
	base   string
	key    Secret
	http   *http.Client
	opts   policy.Options
	now    func() time.Time
	redact redactor
	mu     sync.Mutex // one policy edit at a time from this process
}

var _ Plane = (*Headscale)(nil)

// NewHeadscale returns the headscale backend for cfg. It makes no requests.
func NewHeadscale(cfg HeadscaleConfig) (*Headscale, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("headscale: URL %q: %w", cfg.URL, ErrConfig)
	}
	if cfg.APIKey.IsZero() {
		return nil, fmt.Errorf("headscale: no API key: %w", ErrConfig)
	}
	if _, err := policy.NetworkTag(cfg.Policy.OwnerTag, "x"); err != nil {
		return nil, fmt.Errorf("headscale: %w: %w", ErrConfig, err)
	}
	opts := cfg.Policy
	if len(opts.Admins) == 0 {
		opts.Admins = []string{"autogroup:member"}
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	return &Headscale{
		base:   strings.TrimSuffix(cfg.URL, "/") + "/api/v1",
		key:    cfg.APIKey,
		http:   &http.Client{Transport: newRetryTransport(cfg.Transport, cfg.Retry, headscaleRetryable), Timeout: time.Minute},
		opts:   opts,
		now:    now,
		redact: newRedactor(cfg.APIKey),
	}, nil
}

// HeadscaleError is an error answer from headscale's API.
type HeadscaleError struct {
	// Status is the HTTP status.
	Status int
	// Code is the gRPC status code headscale's gateway reports.
	Code int
	// Message is the server's message.
	Message string
}

// Error describes the answer.
func (e *HeadscaleError) Error() string {
	return fmt.Sprintf("%s (http %d)", e.Message, e.Status)
}

// grpcNotFound is gRPC's NotFound code, which headscale reports for missing
// nodes and keys (sometimes with HTTP 500 when a handler forgot to classify it).
const grpcNotFound = 5

func isNotFound(err error) bool {
	var he *HeadscaleError
	return errors.As(err, &he) && (he.Status == http.StatusNotFound || he.Code == grpcNotFound ||
		strings.Contains(he.Message, "not found"))
}

// call sends a JSON request to path and decodes the JSON answer into out.
func (h *Headscale) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.base+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+h.key.Reveal())
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := h.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		he := &HeadscaleError{Status: resp.StatusCode}
		var st struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		}
		if json.Unmarshal(b, &st) == nil && st.Message != "" {
			he.Code, he.Message = st.Code, st.Message
		} else {
			he.Message = strings.TrimSpace(string(b[:min(len(b), 200)]))
		}
		return he
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}

// EnsureNetwork merges network name into headscale's policy.
func (h *Headscale) EnsureNetwork(ctx context.Context, name string) error {
	return ensureNetwork(ctx, h, "headscale", h.opts, h.redact, name)
}

// RemoveNetwork takes network name out of headscale's policy unless a node still
// carries its tag.
func (h *Headscale) RemoveNetwork(ctx context.Context, name string) error {
	return removeNetwork(ctx, h, "headscale", h.opts, h.redact, name)
}

type hsPolicy struct {
	Policy string `json:"policy"`
}

// editPolicy is a read-modify-write: headscale's policy API has no ETag, so a
// change someone else makes between the read and the write is lost. The mutex
// keeps this process's own edits in order.
func (h *Headscale) editPolicy(ctx context.Context, edit func([]byte) ([]byte, error)) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var cur hsPolicy
	if err := h.call(ctx, http.MethodGet, "/policy", nil, &cur); err != nil {
		var he *HeadscaleError
		if !errors.As(err, &he) || !strings.Contains(he.Message, "policy not found") {
			return fmt.Errorf("read policy: %w", err)
		}
		// No policy stored yet: headscale allows everything, as "{}" would.
		cur.Policy = "{}"
	}
	out, err := edit([]byte(cur.Policy))
	if err != nil {
		return err
	}
	if string(out) == cur.Policy {
		return nil
	}
	if err := h.call(ctx, http.MethodPut, "/policy", hsPolicy{Policy: string(out)}, nil); err != nil {
		return fmt.Errorf("write policy: %w", err)
	}
	return nil
}

// hsKey is headscale's PreAuthKey as its gateway writes it (uint64 as strings).
type hsKey struct {
	ID         string    `json:"id"`
	Key        string    `json:"key"`
	Reusable   bool      `json:"reusable"`
	Ephemeral  bool      `json:"ephemeral"`
	Expiration time.Time `json:"expiration"`
	ACLTags    []string  `json:"aclTags"`
}

// MintAuthKey creates a single-use, non-ephemeral pre-auth key carrying the
// network's tag. Tagged keys belong to no user: the node is owned by its tag.
func (h *Headscale) MintAuthKey(ctx context.Context, req KeyRequest) (AuthKey, error) {
	tag, err := policy.NetworkTag(h.opts.OwnerTag, req.Network)
	if err != nil {
		return AuthKey{}, err
	}
	expiry := req.Expiry
	if expiry <= 0 {
		expiry = DefaultKeyExpiry
	}
	in := struct {
		Reusable   bool      `json:"reusable"`
		Ephemeral  bool      `json:"ephemeral"`
		Expiration time.Time `json:"expiration"`
		ACLTags    []string  `json:"aclTags"`
	}{Expiration: h.now().Add(expiry).UTC(), ACLTags: []string{tag}}
	var out struct {
		PreAuthKey hsKey `json:"preAuthKey"`
	}
	if err := h.call(ctx, http.MethodPost, "/preauthkey", in, &out); err != nil {
		return AuthKey{}, h.redact.err(fmt.Errorf("headscale: mint key for %s in %s: %w", req.VMID, req.Network, err))
	}
	k := out.PreAuthKey
	if k.ID == "" || k.Key == "" {
		return AuthKey{}, fmt.Errorf("headscale: mint key for %s in %s: answer has no key or id", req.VMID, req.Network)
	}
	return AuthKey{ID: k.ID, Key: NewSecret(k.Key), Tag: tag, Expires: k.Expiration}, nil
}

// RevokeAuthKey expires pre-auth key id; one already gone is fine.
func (h *Headscale) RevokeAuthKey(ctx context.Context, id string) error {
	err := h.call(ctx, http.MethodPost, "/preauthkey/expire", map[string]string{"id": id}, nil)
	if err != nil && !isNotFound(err) {
		return h.redact.err(fmt.Errorf("headscale: revoke key %s: %w", id, err))
	}
	return nil
}

// hsNode is the part of headscale's Node threes reads.
type hsNode struct {
	ID          string   `json:"id"`
	Name        string   `json:"name"`
	GivenName   string   `json:"givenName"`
	IPAddresses []string `json:"ipAddresses"`
	Tags        []string `json:"tags"`
	// PreAuthKey is the key the node registered with, as headscale recorded it.
	PreAuthKey *struct {
		ID string `json:"id"`
	} `json:"preAuthKey"`
}

// RemoveDevice deletes node id if it carries a threes network tag.
func (h *Headscale) RemoveDevice(ctx context.Context, id string) error {
	devs, err := h.devices(ctx)
	if err != nil {
		return fmt.Errorf("headscale: remove node %s: %w", id, err)
	}
	for _, d := range devs {
		if d.ID != id {
			continue
		}
		if err := h.call(ctx, http.MethodDelete, "/node/"+url.PathEscape(d.ID), nil, nil); err != nil && !isNotFound(err) {
			return h.redact.err(fmt.Errorf("headscale: remove node %s (%s): %w", d.ID, d.Hostname, err))
		}
	}
	return nil
}

// Devices lists headscale's nodes that carry a threes network tag.
func (h *Headscale) Devices(ctx context.Context) ([]Device, error) {
	devs, err := h.devices(ctx)
	if err != nil {
		return nil, fmt.Errorf("headscale: %w", err)
	}
	return devs, nil
}

func (h *Headscale) devices(ctx context.Context) ([]Device, error) {
	var out struct {
		Nodes []hsNode `json:"nodes"`
	}
	if err := h.call(ctx, http.MethodGet, "/node", nil, &out); err != nil {
		return nil, h.redact.err(fmt.Errorf("list nodes: %w", err))
	}
	var devs []Device
	for _, n := range out.Nodes {
		if !hasNetworkTag(n.Tags, h.opts.OwnerTag) {
			continue
		}
		d := Device{ID: n.ID, Hostname: n.Name, Tags: n.Tags, Addresses: n.IPAddresses}
		if n.PreAuthKey != nil {
			d.AuthKeyID = n.PreAuthKey.ID
		}
		devs = append(devs, d)
	}
	return devs, nil
}
