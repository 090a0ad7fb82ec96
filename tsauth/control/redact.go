package control

import (
	"errors"
	"regexp"
	"strings"
)

// credentialRE matches credentials that might come back inside a server's error
// message: Tailscale and headscale keys by their prefixes, and HTTP authorisation
// values.
var credentialRE = regexp.MustCompile(`(?i)\b(tskey|hskey)-[A-Za-z0-9_-]+|\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+`)

// redactor scrubs known secrets and anything that looks like a credential from
// errors before they leave the package.
type redactor struct{ secrets []string }

func newRedactor(secrets ...Secret) redactor {
	var r redactor
	for _, s := range secrets {
		if v := s.Reveal(); v != "" {
			r.secrets = append(r.secrets, v)
		}
	}
	return r
}

func (r redactor) scrub(s string) string {
	for _, secret := range r.secrets {
		s = strings.ReplaceAll(s, secret, redacted)
	}
	return credentialRE.ReplaceAllStringFunc(s, func(m string) string {
		if i := strings.IndexAny(m, " \t-"); i > 0 {
			return m[:i+1] + redacted
		}
		return redacted
	})
}

// err returns err with its message scrubbed. The result still matches the
// sentinel errors err wraps (errors.Is), but does not hand out the original error,
// whose message might hold a secret.
func (r redactor) err(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	if clean := r.scrub(msg); clean != msg {
		return &redactedError{msg: clean, inner: err}
	}
	return err
}

type redactedError struct {
	msg   string
	inner error
}

func (e *redactedError) Error() string { return e.msg }

// Is lets errors.Is see the sentinels the original error wraps.
func (e *redactedError) Is(target error) bool { return errors.Is(e.inner, target) }
