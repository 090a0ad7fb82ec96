package control

import (
	"fmt"
	"io"
	"log/slog"
)

const redacted = "[REDACTED]"

// Secret holds a credential (an API key, an OAuth client secret, an auth key).
// Every way of printing, logging or marshalling it gives "[REDACTED]"; Reveal is
// the one way to read it. The value sits behind a pointer so that even printing a
// struct with an unexported Secret field shows an address, not the credential.
type Secret struct{ p *string }

// NewSecret wraps s.
func NewSecret(s string) Secret {
	if s == "" {
		return Secret{}
	}
	return Secret{p: &s}
}

// Reveal returns the credential itself, for the one place that must send it.
func (s Secret) Reveal() string {
	if s.p == nil {
		return ""
	}
	return *s.p
}

// IsZero reports whether s holds nothing.
func (s Secret) IsZero() bool { return s.p == nil }

// String returns a redaction.
func (s Secret) String() string { return redacted }

// GoString returns a redaction.
func (s Secret) GoString() string { return redacted }

// Format writes a redaction for every verb.
func (s Secret) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, redacted) }

// LogValue returns a redaction for log/slog.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText returns a redaction, so JSON and other encoders never see the value.
func (s Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
