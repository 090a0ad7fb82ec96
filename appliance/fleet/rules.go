package fleet

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"time"
)

// ValidateName checks a VM or network name: a DNS label of 3 to 63 lowercase letters,
// digits and inner hyphens, because names become tailnet hostnames and ACL tags.
func ValidateName(field, name string) error {
	if n := len(name); n < 3 || n > 63 {
		return fieldErr(field, "%q must be 3 to 63 characters, has %d", name, n)
	}
	for i, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-':
			if i == 0 || i == len(name)-1 {
				return fieldErr(field, "%q must not start or end with a hyphen", name)
			}
		case c >= 'A' && c <= 'Z':
			return fieldErr(field, "%q must be lowercase", name)
		default:
			return fieldErr(field, "%q may hold only letters, digits and hyphens, not %q", name, c)
		}
	}
	return nil
}

// ValidateDescription checks a description: printable ASCII, at most 256 characters.
func ValidateDescription(d string) error {
	if len(d) > 256 {
		return fieldErr("description", "must be at most 256 characters, has %d", len(d))
	}
	for _, c := range []byte(d) {
		if c < 0x20 || c > 0x7e {
			return fieldErr("description", "must be printable ASCII, has byte 0x%02x", c)
		}
	}
	return nil
}

// ValidatePublicKey checks that an SSH public key, if given, is one line of
// "type base64 [comment]": the metadata server hands it to the guest verbatim.
func ValidatePublicKey(k string) error {
	if k == "" {
		return nil
	}
	if strings.ContainsAny(k, "\r\n") {
		return fieldErr("public_key", "must be a single line")
	}
	f := strings.Fields(k)
	if len(f) < 2 || !(strings.HasPrefix(f[0], "ssh-") || strings.HasPrefix(f[0], "ecdsa-") || strings.HasPrefix(f[0], "sk-")) {
		return fieldErr("public_key", "must look like \"ssh-ed25519 AAAA... comment\"")
	}
	return nil
}

// ValidateKey checks a key/value key: 1 to 128 characters of letters, digits and . _ - /.
func ValidateKey(k string) error {
	if k == "" || len(k) > 128 {
		return fieldErr("key", "%q must be 1 to 128 characters", k)
	}
	for _, c := range k {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._-/", c)
		if !ok {
			return fieldErr("key", "%q may hold only letters, digits and . _ - /", k)
		}
	}
	// A VM reads a key back at /v1/kv/KEY, and HTTP clients clean such paths:
	// a key with an empty, "." or ".." segment would be unreadable by its name.
	for _, seg := range strings.Split(k, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fieldErr("key", "%q: each /-separated part must be a name (not empty, . or ..), as the VM reads it at /v1/kv/%s", k, k)
		}
	}
	return nil
}

// maxValueLen bounds a key/value's value and a startup script: metadata, not storage.
const maxValueLen = 64 << 10

// idEncoding is base32hex in lower case, the alphabet of threes v0.1's IDs.
var idEncoding = base32.NewEncoding("0123456789abcdefghijklmnopqrstuv").WithPadding(base32.NoPadding)

// NewID returns a 20-character VM ID in threes v0.1's format (e.g. d1e4dplqs5f51296gtdg):
// 12 bytes, a big-endian Unix time in seconds then 8 random bytes, so IDs sort by age.
func NewID(now time.Time) string {
	var b [12]byte
	binary.BigEndian.PutUint32(b[:4], uint32(now.Unix()))
	rand.Read(b[4:])
	return idEncoding.EncodeToString(b[:])
}

// ValidateID checks that id has the shape of a VM ID.
func ValidateID(id string) error {
	if len(id) != 20 {
		return fieldErr("id", "%q is not a VM ID: want 20 characters, has %d", id, len(id))
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'v') {
			return fieldErr("id", "%q is not a VM ID: bad character %q", id, c)
		}
	}
	return nil
}

// NewMAC returns a random unicast MAC in QEMU's locally administered range 52:54:00.
func NewMAC() net.HardwareAddr {
	var b [3]byte
	rand.Read(b[:])
	return net.HardwareAddr{0x52, 0x54, 0x00, b[0], b[1], b[2]}
}

// FieldError is bad input in one named field of a request.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}
