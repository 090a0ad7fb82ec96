package appliance

import "testing"

// TestGuestControlURL: guests are sent the appliance's control server, and
// nothing for Tailscale's own under either of its names.
func TestGuestControlURL(t *testing.T) {
	for in, want := range map[string]string{
		"":                                   "",
		"https://controlplane.tailscale.com": "",
		"https://login.tailscale.com":        "",
		"http://100.64.0.1:8080":             "http://100.64.0.1:8080",
		"https://headscale.example.com":      "https://headscale.example.com",
	} {
		if got := guestControlURL(in); got != want {
			t.Errorf("guestControlURL(%q) = %q, want %q", in, got, want)
		}
	}
}
