//go:build threes_testhooks

package fleet

import "os"

// The crash test builds threes with the threes_testhooks tag and names the step in
// the environment; release builds carry no way to make Create exit.
func init() { crashAt = os.Getenv("THREES_TEST_CRASH_AT") }
