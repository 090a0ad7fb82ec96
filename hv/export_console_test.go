package hv

// ConsoleRecorded returns what h keeps of domain id's recent console output,
// and whether a recorder holds its console.
func ConsoleRecorded(h *Libvirt, id string) ([]byte, bool) {
	h.rec.mu.Lock()
	r := h.rec.m[id]
	h.rec.mu.Unlock()
	if r == nil || r.ended() {
		return nil, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ring.bytes(), true
}

// ConsoleLag is how far a console session may fall behind.
const ConsoleLag = consoleLag
