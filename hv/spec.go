package hv

// Validate reports what is wrong with s, if anything, as Create checks it
// before it makes anything: an error wrapping ErrInvalidSpec that names the
// field. It looks at no file, bridge or libvirtd, so a Spec that passes may
// still fail to create (a missing image file, a missing bridge).
func (s Spec) Validate() error { return s.validate() }
