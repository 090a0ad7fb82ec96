package appliance

import (
	"context"
	"net"
	"time"

	"github.com/threes-dev/threes/embeddb"
)

// SetBeforeReconcile makes every reconcile pass of an appliance started with o run
// f first, so a test can hold a pass back.
func SetBeforeReconcile(o *Options, f func(context.Context)) { o.hooks.BeforePass = f }

// SetGenerators makes an appliance started with o take new VMs' MACs and IDs from
// mac and id (nil keeps fleet.NewMAC or fleet.NewID), so a test can force collisions.
func SetGenerators(o *Options, mac func() net.HardwareAddr, id func(time.Time) string) {
	o.hooks.NewMAC, o.hooks.NewID = mac, id
}

// DB returns the appliance's database, for tests that write what another host of a
// cluster would.
func (a *Appliance) DB() *embeddb.DB { return a.db }
