package control

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
	tsapi "tailscale.com/client/tailscale/v2"

	"github.com/threes-dev/threes/tsauth/policy"
)

// TailscaleConfig configures the backend for Tailscale's hosted control plane.
type TailscaleConfig struct {
	// BaseURL is the API server (default https://api.tailscale.com).
	BaseURL string
	// Tailnet is the tailnet's name (default "-": the credential's own tailnet).
	Tailnet string
	// APIKey is an API access token. It expires (90 days at most); prefer OAuth.
	APIKey Secret
	// OAuthClientID and OAuthClientSecret are an OAuth client's credentials, which
	// do not expire. The client needs the policy_file, auth_keys and devices:core
	// scopes, and tags: the appliance's own tag.
	OAuthClientID     string
	OAuthClientSecret Secret
	// OAuthScopes are requested with each token (default: all of the client's).
	OAuthScopes []string
	// Policy says how networks are written; Policy.OwnerTag is required.
	Policy policy.Options
	// Transport carries the HTTP requests (default http.DefaultTransport).
	Transport http.RoundTripper
	// Retry governs retries on 429 and 5xx.
	Retry Retry
	// PolicyAttempts bounds the read-modify-write tries when the policy changes
	// between read and write (HTTP 412); default 5.
	PolicyAttempts int
}

// Tailscale is the Plane of a tailnet on Tailscale's hosted control plane, driven
// through tailscale.com/client/tailscale/v2.
type Tailscale struct {
	client   *tsapi.Client
	opts     policy.Options
	attempts int
	redact   redactor
	mu       sync.Mutex // one policy edit at a time from this process
}

var _ Plane = (*Tailscale)(nil)

// NewTailscale returns the Tailscale backend for cfg. It makes no requests.
func NewTailscale(cfg TailscaleConfig) (*Tailscale, error) {
	oauth := cfg.OAuthClientID != "" || !cfg.OAuthClientSecret.IsZero()
	switch {
	case oauth && !cfg.APIKey.IsZero():
		return nil, fmt.Errorf("tailscale: both an API key and an OAuth client given: %w", ErrConfig)
	case oauth && (cfg.OAuthClientID == "" || cfg.OAuthClientSecret.IsZero()):
		return nil, fmt.Errorf("tailscale: OAuth client needs both an ID and a secret: %w", ErrConfig)
	case !oauth && cfg.APIKey.IsZero():
		return nil, fmt.Errorf("tailscale: no API key or OAuth client: %w", ErrConfig)
	}
	if _, err := policy.NetworkTag(cfg.Policy.OwnerTag, "x"); err != nil {
		return nil, fmt.Errorf("tailscale: %w: %w", ErrConfig, err)
	}
	base := "https://api.tailscale.com"
	if cfg.BaseURL != "" {
		base = strings.TrimSuffix(cfg.BaseURL, "/")
	}
	u, err := url.Parse(base)
	if err != nil {
		return nil, fmt.Errorf("tailscale: base URL: %w: %w", ErrConfig, err)
	}
	transport := newRetryTransport(cfg.Transport, cfg.Retry, tailscaleRetryable)
	c := &tsapi.Client{
		BaseURL:   u,
		Tailnet:   cfg.Tailnet,
		UserAgent: "threes",
		HTTP:      &http.Client{Transport: transport, Timeout: time.Minute},
	}
	if oauth {
		c.Auth = &oauthAuth{
			id: cfg.OAuthClientID, secret: cfg.OAuthClientSecret, scopes: cfg.OAuthScopes,
			tokenHTTP: &http.Client{Transport: transport, Timeout: time.Minute},
		}
	} else {
		c.APIKey = cfg.APIKey.Reveal()
	}
	attempts := cfg.PolicyAttempts
	if attempts <= 0 {
		attempts = 5
	}
	return &Tailscale{
		client:   c,
		opts:     cfg.Policy,
		attempts: attempts,
		redact:   newRedactor(cfg.APIKey, cfg.OAuthClientSecret),
	}, nil
}

// oauthAuth is tsapi.OAuth with the token exchange going through our transport,
// so it is retried like every other call.
type oauthAuth struct {
	id        string
	secret    Secret
	scopes    []string
	tokenHTTP *http.Client
}

// HTTPClient returns a client that adds a bearer token, fetched and refreshed
// from baseURL's /api/v2/oauth/token with the client credentials.
func (o *oauthAuth) HTTPClient(orig *http.Client, baseURL string) *http.Client {
	cc := clientcredentials.Config{
		ClientID:     o.id,
		ClientSecret: o.secret.Reveal(),
		Scopes:       o.scopes,
		TokenURL:     strings.TrimSuffix(baseURL, "/") + "/api/v2/oauth/token",
		AuthStyle:    oauth2.AuthStyleInParams, // as Tailscale's docs send them
	}
	// The token source outlives any one call, hence Background.
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, o.tokenHTTP)
	return &http.Client{
		Transport: &oauth2.Transport{Base: orig.Transport, Source: oauth2.ReuseTokenSource(nil, cc.TokenSource(ctx))},
		Timeout:   orig.Timeout,
	}
}

// EnsureNetwork merges network name into the tailnet policy, retrying on 412
// when someone else changed it in between.
func (t *Tailscale) EnsureNetwork(ctx context.Context, name string) error {
	return ensureNetwork(ctx, t, "tailscale", t.opts, t.redact, name)
}

// RemoveNetwork takes network name out of the tailnet policy unless a device
// still carries its tag.
func (t *Tailscale) RemoveNetwork(ctx context.Context, name string) error {
	return removeNetwork(ctx, t, "tailscale", t.opts, t.redact, name)
}

// editPolicy reads the policy with its ETag, applies edit, and writes the result
// back with If-Match; on 412 it starts over, at most t.attempts times.
func (t *Tailscale) editPolicy(ctx context.Context, edit func([]byte) ([]byte, error)) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for range t.attempts {
		raw, err := t.client.PolicyFile().Raw(ctx)
		if err != nil {
			return fmt.Errorf("read policy: %w", err)
		}
		if raw.ETag == "" {
			return errors.New("read policy: no ETag in the answer, refusing an unconditional write")
		}
		out, err := edit([]byte(raw.HuJSON))
		if err != nil {
			return err
		}
		if string(out) == raw.HuJSON {
			return nil
		}
		err = t.client.PolicyFile().Set(ctx, string(out), raw.ETag)
		if err == nil {
			return nil
		}
		if apiStatus(err) != http.StatusPreconditionFailed {
			return fmt.Errorf("write policy: %w", err)
		}
	}
	return fmt.Errorf("write policy: %d attempts: %w", t.attempts, ErrPolicyConflict)
}

func apiStatus(err error) int {
	var apiErr tsapi.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Status
	}
	return 0
}

// MintAuthKey creates a pre-authorised, single-use, non-ephemeral key tagged
// with the network's tag.
func (t *Tailscale) MintAuthKey(ctx context.Context, req KeyRequest) (AuthKey, error) {
	tag, err := policy.NetworkTag(t.opts.OwnerTag, req.Network)
	if err != nil {
		return AuthKey{}, err
	}
	expiry := req.Expiry
	if expiry <= 0 {
		expiry = DefaultKeyExpiry
	}
	var caps tsapi.KeyCapabilities
	caps.Devices.Create.Reusable = false
	// Not ephemeral: a stopped VM must keep its device; threes deletes it with the VM.
	caps.Devices.Create.Ephemeral = false
	caps.Devices.Create.Preauthorized = true
	caps.Devices.Create.Tags = []string{tag}
	key, err := t.client.Keys().CreateAuthKey(ctx, tsapi.CreateKeyRequest{
		Capabilities:  caps,
		ExpirySeconds: int64(expiry / time.Second),
		Description:   keyDescription(req.VMID),
	})
	if err != nil {
		return AuthKey{}, t.redact.err(fmt.Errorf("tailscale: mint key for %s in %s: %w", req.VMID, req.Network, err))
	}
	if key.Key == "" || key.ID == "" {
		return AuthKey{}, fmt.Errorf("tailscale: mint key for %s in %s: answer has no key or id", req.VMID, req.Network)
	}
	return AuthKey{ID: key.ID, Key: NewSecret(key.Key), Tag: tag, Expires: key.Expires}, nil
}

// keyDescription fits Tailscale's rule for key descriptions: at most 50
// characters of letters, digits, spaces and dashes.
func keyDescription(vmID string) string {
	d := []byte("threes vm ")
	for _, c := range []byte(vmID) {
		if c == '-' || c == ' ' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' {
			d = append(d, c)
		}
	}
	return string(d[:min(len(d), 50)])
}

// RevokeAuthKey deletes key id; a key already gone is fine.
func (t *Tailscale) RevokeAuthKey(ctx context.Context, id string) error {
	if err := t.client.Keys().Delete(ctx, id); err != nil && !tsapi.IsNotFound(err) {
		return t.redact.err(fmt.Errorf("tailscale: revoke key %s: %w", id, err))
	}
	return nil
}

// RemoveDevice deletes device id if it carries a threes network tag.
func (t *Tailscale) RemoveDevice(ctx context.Context, id string) error {
	devs, err := t.devices(ctx)
	if err != nil {
		return fmt.Errorf("tailscale: remove device %s: %w", id, err)
	}
	for _, d := range devs {
		if d.ID != id {
			continue
		}
		if err := t.client.Devices().Delete(ctx, d.ID); err != nil && !tsapi.IsNotFound(err) {
			return t.redact.err(fmt.Errorf("tailscale: remove device %s (%s): %w", d.ID, d.Hostname, err))
		}
	}
	return nil
}

// Devices lists the tailnet's devices that carry a threes network tag.
func (t *Tailscale) Devices(ctx context.Context) ([]Device, error) {
	devs, err := t.devices(ctx)
	if err != nil {
		return nil, fmt.Errorf("tailscale: %w", err)
	}
	return devs, nil
}

func (t *Tailscale) devices(ctx context.Context) ([]Device, error) {
	all, err := t.client.Devices().List(ctx)
	if err != nil {
		return nil, t.redact.err(fmt.Errorf("list devices: %w", err))
	}
	var out []Device
	for _, d := range all {
		if !hasNetworkTag(d.Tags, t.opts.OwnerTag) {
			continue
		}
		id := d.NodeID
		if id == "" {
			id = d.ID
		}
		out = append(out, Device{ID: id, Hostname: d.Hostname, Tags: d.Tags, Addresses: d.Addresses})
	}
	return out, nil
}

// hasNetworkTag reports whether tags hold a network tag of ownerTag's appliance.
func hasNetworkTag(tags []string, ownerTag string) bool {
	return slices.ContainsFunc(tags, func(tag string) bool { return strings.HasPrefix(tag, ownerTag+"-") })
}
