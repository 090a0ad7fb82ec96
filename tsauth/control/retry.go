package control

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"
)

// Retry says how API calls are retried when the server answers 429 or a 5xx
// status. Zero fields take the defaults shown.
type Retry struct {
	// Attempts is the most tries per call, the first included (default 5).
	Attempts int
	// Base is the first wait; each further one doubles (default 500ms).
	Base time.Duration
	// Max caps every wait, Retry-After included (default 30s).
	Max time.Duration
	// Sleep waits d or until ctx ends (default: a timer). Tests inject one that
	// records the waits and returns at once.
	Sleep func(ctx context.Context, d time.Duration) error
	// Now is the clock Retry-After dates are read against (default time.Now).
	Now func() time.Time
}

func (r Retry) withDefaults() Retry {
	if r.Attempts <= 0 {
		r.Attempts = 5
	}
	if r.Base <= 0 {
		r.Base = 500 * time.Millisecond
	}
	if r.Max <= 0 {
		r.Max = 30 * time.Second
	}
	if r.Sleep == nil {
		r.Sleep = sleepCtx
	}
	if r.Now == nil {
		r.Now = time.Now
	}
	return r
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// retryTransport retries requests answered with a retryable status. It sits
// below the API clients, so every call, the OAuth token exchange included, gets
// the same bounded backoff without each call site repeating it.
type retryTransport struct {
	base      http.RoundTripper
	retry     Retry
	retryable func(status int) bool
}

func newRetryTransport(base http.RoundTripper, r Retry, retryable func(int) bool) *retryTransport {
	if base == nil {
		base = http.DefaultTransport
	}
	return &retryTransport{base: base, retry: r.withDefaults(), retryable: retryable}
}

// RoundTrip sends req, again after a wait while the answer is retryable and
// attempts remain. The last answer, retryable or not, goes to the caller.
func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 1; ; attempt++ {
		r := req
		if attempt > 1 && req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return nil, errors.New("retry request: body cannot be replayed")
			}
			body, err := req.GetBody()
			if err != nil {
				return nil, err
			}
			r = req.Clone(req.Context())
			r.Body = body
		}
		resp, err := t.base.RoundTrip(r)
		if err != nil || !t.retryable(resp.StatusCode) || attempt >= t.retry.Attempts {
			return resp, err
		}
		wait := t.wait(attempt, resp.Header.Get("Retry-After"))
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if err := t.retry.Sleep(req.Context(), wait); err != nil {
			return nil, err
		}
	}
}

// wait is the pause before attempt+1: what Retry-After asks for when it says,
// else exponential backoff; never more than Max.
func (t *retryTransport) wait(attempt int, retryAfter string) time.Duration {
	d := t.retry.Base << (attempt - 1)
	if secs, err := strconv.Atoi(retryAfter); err == nil && secs >= 0 {
		d = time.Duration(secs) * time.Second
	} else if when, err := http.ParseTime(retryAfter); err == nil {
		d = max(when.Sub(t.retry.Now()), 0)
	}
	if d > t.retry.Max || d < 0 {
		d = t.retry.Max
	}
	return d
}

// tailscaleRetryable: Tailscale's API rate-limits with 429 and its 5xx answers
// are server trouble worth another try.
func tailscaleRetryable(status int) bool {
	return status == http.StatusTooManyRequests || status >= 500
}

// headscaleRetryable leaves out 500: headscale answers every error it did not
// classify (a policy that fails validation, say) with gRPC Unknown, which its
// gateway turns into 500, so a 500 there is usually not transient.
func headscaleRetryable(status int) bool {
	return status == http.StatusTooManyRequests || status == http.StatusBadGateway ||
		status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout
}
