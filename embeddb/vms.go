package embeddb

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"
)

// VM is a virtual machine's record. MAC and IP come from its address.
type VM struct {
	ID          string
	Name        string
	Description string
	Network     string
	Image       string
	Type        string
	MAC         string
	IP          string
	State       string // what libvirt last reported, or the create under way
	Desired     string // what the VM's owner asked for; reconcile converges on it
	Host        string
	CreatedAt   time.Time
	UpdatedAt   time.Time
	DeletedAt   time.Time // zero while live
	// Phases are the steps the VM reached (or failed) on its way onto the tailnet,
	// oldest first.
	Phases []VMPhase
	// NodeID is the control plane's ID of the tailnet node the VM joined as; empty
	// until the appliance saw it join.
	NodeID string
}

// Live reports whether the VM has not been soft-deleted.
func (vm VM) Live() bool { return vm.DeletedAt.IsZero() }

// VMConfig is what a VM fetches from the metadata server at boot. AuthKey is
// a secret: String and LogValue redact it.
type VMConfig struct {
	VMID            string
	Hostname        string
	Script          string
	PublicKey       string
	AuthKey         string
	AuthKeyID       string    // the control plane's ID of AuthKey, to revoke it
	AuthKeyServedAt time.Time // zero until TakeAuthKey hands the key out
}

// String prints the config with the auth key redacted.
func (c VMConfig) String() string {
	return fmt.Sprintf("{VMID:%s Hostname:%s Script:(%d bytes) PublicKey:%q AuthKey:%s AuthKeyID:%s AuthKeyServedAt:%s}",
		c.VMID, c.Hostname, len(c.Script), c.PublicKey, redact(c.AuthKey), c.AuthKeyID, c.AuthKeyServedAt.Format(time.RFC3339Nano))
}

// GoString is String, so %#v does not leak the auth key either.
func (c VMConfig) GoString() string { return c.String() }

// LogValue logs the config with the auth key redacted.
func (c VMConfig) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("vm_id", c.VMID),
		slog.String("hostname", c.Hostname),
		slog.String("auth_key", redact(c.AuthKey)),
		slog.Time("auth_key_served_at", c.AuthKeyServedAt))
}

func redact(secret string) string {
	if secret == "" {
		return `""`
	}
	return "REDACTED"
}

// canonicalMAC parses a MAC address and returns its canonical lower-case
// colon form, the one stored.
func canonicalMAC(mac string) (string, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return "", fieldErr(FieldMAC, mac, ErrInvalid)
	}
	return hw.String(), nil
}

const vmColumns = `v.id, v.name, v.description, v.network, v.image, v.type,
	COALESCE(a.mac, ''), COALESCE(a.ip, ''), v.state, v.host,
	v.created_at, v.updated_at, v.deleted_at, v.desired, v.tailnet_node_id
	FROM vms v LEFT JOIN addresses a ON a.vm_id = v.id`

func scanVM(r row) VM {
	return VM{
		ID: r.str(0), Name: r.str(1), Description: r.str(2), Network: r.str(3),
		Image: r.str(4), Type: r.str(5), MAC: r.str(6), IP: r.str(7), State: r.str(8),
		Host: r.str(9), CreatedAt: r.time(10), UpdatedAt: r.time(11), DeletedAt: r.time(12),
		Desired: r.str(13), NodeID: r.str(14),
	}
}

// CreateVM writes vm, its config and its address in one transaction: a
// failure leaves nothing behind. vm.Network must name an existing network
// (else a network name ErrNotFound). vm.MAC and vm.IP, and cfg.VMID,
// addr.VMID and addr.Host, may be empty (taken from addr, vm.ID and vm.Host)
// but must agree if set. A live VM's name and an address's MAC are unique in
// the cluster, an address's IP on its host (ErrExists). UpdatedAt defaults to
// CreatedAt.
func (db *DB) CreateVM(ctx context.Context, vm VM, cfg VMConfig, addr Address) error {
	if vm.ID == "" || vm.Name == "" || vm.Network == "" {
		return fmt.Errorf("create vm: id, name and network are required: %w", ErrInvalid)
	}
	if !vm.DeletedAt.IsZero() {
		return fmt.Errorf("create vm %s: deleted_at must be zero: %w", vm.ID, ErrInvalid)
	}
	if vm.UpdatedAt.IsZero() {
		vm.UpdatedAt = vm.CreatedAt
	}
	for _, c := range []struct {
		what     string
		t        time.Time
		required bool
	}{{"created_at", vm.CreatedAt, true}, {"updated_at", vm.UpdatedAt, true},
		{"auth_key_served_at", cfg.AuthKeyServedAt, false}, {"leased_at", addr.LeasedAt, false}} {
		if err := checkTime(c.what, c.t, c.required); err != nil {
			return fmt.Errorf("create vm %s: %w", vm.ID, err)
		}
	}
	if !addr.IP.IsValid() {
		return fmt.Errorf("create vm %s: %w", vm.ID, fieldErr(FieldIP, "", ErrInvalid))
	}
	ip := addr.IP.Unmap().String()
	mac, err := canonicalMAC(addr.MAC)
	if err != nil {
		return fmt.Errorf("create vm %s: %w", vm.ID, err)
	}
	if vm.IP != "" {
		if p, err := netip.ParseAddr(vm.IP); err != nil || p.Unmap().String() != ip {
			return fmt.Errorf("create vm %s: vm ip %q differs from address %s: %w", vm.ID, vm.IP, ip, ErrInvalid)
		}
	}
	if vm.MAC != "" {
		if m, err := canonicalMAC(vm.MAC); err != nil || m != mac {
			return fmt.Errorf("create vm %s: vm mac %q differs from address %s: %w", vm.ID, vm.MAC, mac, ErrInvalid)
		}
	}
	if (cfg.VMID != "" && cfg.VMID != vm.ID) || (addr.VMID != "" && addr.VMID != vm.ID) {
		return fmt.Errorf("create vm %s: config or address belongs to another vm: %w", vm.ID, ErrInvalid)
	}
	if addr.Host != "" && addr.Host != vm.Host {
		return fmt.Errorf("create vm %s: address host %q differs from vm host %q: %w", vm.ID, addr.Host, vm.Host, ErrInvalid)
	}

	defer db.touch(vm.ID)
	_, err = db.exec(ctx,
		q(`INSERT INTO vms (id, name, description, network, image, type, state, desired, host, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			vm.ID, vm.Name, vm.Description, vm.Network, vm.Image, vm.Type, vm.State, vm.Desired, vm.Host,
			timeArg(vm.CreatedAt), timeArg(vm.UpdatedAt)),
		q(`INSERT INTO vm_configs (vm_id, hostname, script, public_key, auth_key, auth_key_served_at, auth_key_id)
			VALUES (?, ?, ?, ?, ?, ?, ?)`,
			vm.ID, cfg.Hostname, cfg.Script, cfg.PublicKey, cfg.AuthKey, timeArg(cfg.AuthKeyServedAt), cfg.AuthKeyID),
		q(`INSERT INTO addresses (host, ip, mac, hostname, vm_id, leased_at) VALUES (?, ?, ?, ?, ?, ?)`,
			vm.Host, ip, mac, addr.Hostname, vm.ID, timeArg(addr.LeasedAt)))
	if cols, ok := uniqueViolation(err); ok {
		switch cols {
		case "vms.id", "vm_configs.vm_id", "addresses.vm_id":
			return fieldErr(FieldVMID, vm.ID, ErrExists)
		case "vms.name":
			return fieldErr(FieldVMName, vm.Name, ErrExists)
		case "addresses.host, addresses.ip":
			return fieldErr(FieldIP, ip, ErrExists)
		case "addresses.mac":
			return fieldErr(FieldMAC, mac, ErrExists)
		}
	}
	if sqlErrorIs(err, "embeddb: network does not exist") {
		return fieldErr(FieldNetworkName, vm.Network, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("create vm %s: %w", vm.ID, err)
	}
	return nil
}

// GetVM returns the VM with this ID, live or soft-deleted.
func (db *DB) GetVM(ctx context.Context, id string) (VM, error) {
	res, err := db.query(ctx, q(`SELECT `+vmColumns+` WHERE v.id = ?`, id),
		q(phaseColumns+` WHERE vm_id = ?`, id))
	if err != nil {
		return VM{}, fmt.Errorf("get vm %s: %w", id, err)
	}
	vms := withPhases(rows(res[0]), rows(res[1]))
	if len(vms) == 0 {
		return VM{}, fieldErr(FieldVMID, id, ErrNotFound)
	}
	return vms[0], nil
}

// VMByName returns the live VM with this name.
func (db *DB) VMByName(ctx context.Context, name string) (VM, error) {
	res, err := db.query(ctx, q(`SELECT `+vmColumns+` WHERE v.name = ? AND v.deleted_at IS NULL`, name),
		q(phaseColumns+` WHERE vm_id IN (SELECT id FROM vms WHERE name = ? AND deleted_at IS NULL)`, name))
	if err != nil {
		return VM{}, fmt.Errorf("get vm by name %q: %w", name, err)
	}
	vms := withPhases(rows(res[0]), rows(res[1]))
	if len(vms) == 0 {
		return VM{}, fieldErr(FieldVMName, name, ErrNotFound)
	}
	return vms[0], nil
}

// ListVMs returns all VMs, soft-deleted ones included, oldest first.
func (db *DB) ListVMs(ctx context.Context) ([]VM, error) {
	res, err := db.query(ctx, q(`SELECT `+vmColumns+` ORDER BY v.created_at, v.id`), q(phaseColumns))
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	return withPhases(rows(res[0]), rows(res[1])), nil
}

// SetVMState records the VM's state (live or soft-deleted) at time at.
func (db *DB) SetVMState(ctx context.Context, id, state string, at time.Time) error {
	defer db.touch(id)
	if err := checkTime("state time", at, true); err != nil {
		return fmt.Errorf("set vm %s state: %w", id, err)
	}
	res, err := db.exec(ctx, q(`UPDATE vms SET state = ?, updated_at = ? WHERE id = ?`, state, timeArg(at), id))
	if err != nil {
		return fmt.Errorf("set vm %s state: %w", id, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldVMID, id, ErrNotFound)
	}
	return nil
}

// SetVMDesired records the state the VM's owner wants it in (live or
// soft-deleted) at time at.
func (db *DB) SetVMDesired(ctx context.Context, id, desired string, at time.Time) error {
	defer db.touch(id)
	if err := checkTime("desired time", at, true); err != nil {
		return fmt.Errorf("set vm %s desired state: %w", id, err)
	}
	res, err := db.exec(ctx, q(`UPDATE vms SET desired = ?, updated_at = ? WHERE id = ?`, desired, timeArg(at), id))
	if err != nil {
		return fmt.Errorf("set vm %s desired state: %w", id, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldVMID, id, ErrNotFound)
	}
	return nil
}

// ObserveVMState records state, as the hypervisor reported it at time at, for
// a live VM whose recorded state is neither state already nor one of keep
// (such as a create still under way, whose own writes win). It reports
// whether it changed the record; a deleted or unknown VM changes nothing
// and is not an error, since reports about it may arrive late.
func (db *DB) ObserveVMState(ctx context.Context, id, state string, keep []string, at time.Time) (bool, error) {
	defer db.touch(id)
	if err := checkTime("state time", at, true); err != nil {
		return false, fmt.Errorf("observe vm %s state: %w", id, err)
	}
	sql := `UPDATE vms SET state = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL AND state <> ?`
	args := []any{state, timeArg(at), id, state}
	if len(keep) > 0 {
		sql += ` AND state NOT IN (?` + strings.Repeat(`, ?`, len(keep)-1) + `)`
		for _, k := range keep {
			args = append(args, k)
		}
	}
	res, err := db.exec(ctx, q(sql, args...))
	if err != nil {
		return false, fmt.Errorf("observe vm %s state: %w", id, err)
	}
	return rowsAffected(res, 0) > 0, nil
}

// MarkVMDeleted soft-deletes a live VM at time at, freeing its name (its
// address stays held until PurgeVM). ErrNotFound if no live VM has this ID.
func (db *DB) MarkVMDeleted(ctx context.Context, id string, at time.Time) error {
	defer db.touch(id)
	if err := checkTime("deletion time", at, true); err != nil {
		return fmt.Errorf("mark vm %s deleted: %w", id, err)
	}
	res, err := db.exec(ctx, q(`UPDATE vms SET deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL`,
		timeArg(at), timeArg(at), id))
	if err != nil {
		return fmt.Errorf("mark vm %s deleted: %w", id, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldVMID, id, ErrNotFound)
	}
	return nil
}

// PurgeVM removes the VM and, by cascade in the same statement, its config,
// KVs and address, freeing its name, MAC and IP.
func (db *DB) PurgeVM(ctx context.Context, id string) error {
	defer db.touch(id)
	res, err := db.exec(ctx, q(`DELETE FROM vms WHERE id = ?`, id))
	if err != nil {
		return fmt.Errorf("purge vm %s: %w", id, err)
	}
	if rowsAffected(res, 0) == 0 {
		return fieldErr(FieldVMID, id, ErrNotFound)
	}
	return nil
}

// GetVMConfig returns the VM's config, auth key included.
func (db *DB) GetVMConfig(ctx context.Context, vmID string) (VMConfig, error) {
	res, err := db.query(ctx, q(`SELECT vm_id, hostname, script, public_key, auth_key, auth_key_served_at, auth_key_id
		FROM vm_configs WHERE vm_id = ?`, vmID))
	if err != nil {
		return VMConfig{}, fmt.Errorf("get vm %s config: %w", vmID, err)
	}
	rs := rows(res[0])
	if len(rs) == 0 {
		return VMConfig{}, fieldErr(FieldVMID, vmID, ErrNotFound)
	}
	r := rs[0]
	return VMConfig{
		VMID: r.str(0), Hostname: r.str(1), Script: r.str(2), PublicKey: r.str(3),
		AuthKey: r.str(4), AuthKeyServedAt: r.time(5), AuthKeyID: r.str(6),
	}, nil
}

// TakeAuthKey hands out the VM's auth key once: one conditional update marks
// it served at time at and returns it (as stored, so possibly empty). Later
// calls get ErrAlreadyServed; an unknown VM gets ErrNotFound. It does not
// check that the VM is live: the caller decides who may fetch it.
func (db *DB) TakeAuthKey(ctx context.Context, vmID string, at time.Time) (string, error) {
	defer db.touch(vmID)
	if err := checkTime("served time", at, true); err != nil {
		return "", fmt.Errorf("take vm %s auth key: %w", vmID, err)
	}
	s := q(`UPDATE vm_configs SET auth_key_served_at = ?
		WHERE vm_id = ? AND auth_key_served_at IS NULL
		RETURNING auth_key`, timeArg(at), vmID)
	s.returning = true
	res, err := db.exec(ctx, s)
	if err != nil {
		return "", fmt.Errorf("take vm %s auth key: %w", vmID, err)
	}
	qr := res[0].GetQ()
	if qr == nil {
		return "", fmt.Errorf("take vm %s auth key: update returned no rows result", vmID)
	}
	if rs := rows(qr); len(rs) == 1 {
		return rs[0].str(0), nil
	}
	// Nothing updated: either there is no such config or the key was served.
	// Served never reverts, so this later read cannot mistake one for the other.
	if _, err := db.GetVMConfig(ctx, vmID); err != nil {
		return "", err
	}
	return "", fieldErr(FieldVMID, vmID, ErrAlreadyServed)
}
