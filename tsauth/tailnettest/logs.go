package tailnettest

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/types/logger"
)

// maxLogBytes bounds the kept log: the end of it explains a failure.
const maxLogBytes = 512 << 10

// logBuffer keeps the last maxLogBytes of tailscale's logs, which are far
// too chatty to print unless a test failed. Writing to it stays safe after
// the test ended, unlike t.Logf.
type logBuffer struct {
	mu      sync.Mutex
	lines   []string
	size    int
	dropped int
}

func newLogBuffer() *logBuffer { return &logBuffer{} }

// logf returns a logger.Logf that prefixes each line with prefix.
func (b *logBuffer) logf(prefix string) logger.Logf {
	return func(format string, args ...any) {
		line := time.Now().Format("15:04:05.000000 ") + prefix + strings.TrimSuffix(fmt.Sprintf(format, args...), "\n")
		b.mu.Lock()
		defer b.mu.Unlock()
		b.lines = append(b.lines, line)
		b.size += len(line)
		for b.size > maxLogBytes && len(b.lines) > 1 {
			b.size -= len(b.lines[0])
			b.lines = b.lines[1:]
			b.dropped++
		}
	}
}

// dump prints the kept log to t.
func (b *logBuffer) dump(t testing.TB) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dropped > 0 {
		t.Logf("tailnettest: %d earlier log lines dropped", b.dropped)
	}
	t.Logf("tailnettest: tailscale logs:\n%s", strings.Join(b.lines, "\n"))
}
