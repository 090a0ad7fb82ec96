# threes: build, test, benchmark. `make test` is what CI runs (as root).
GO       ?= go
BIN      := $(CURDIR)/bin
TOOLS    := $(CURDIR)/.tools/bin
PROTOC_GEN_GO      := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
PROTOC_GEN_GO_GRPC := google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
# Fuzz targets and how long each runs in `make test`.
FUZZTIME ?= 20s

.PHONY: build run serve test test-go fuzz bench lint proto headscale tailscaled testimage labimage cloudimage clean mutation modules prereqs-run prereqs-test prereqs-bench

build:
	$(GO) build -o $(BIN)/threes ./cmd/threes

# prereqs-run, -test, -bench check in seconds what each target needs on this host, and
# install the missing Debian packages (as root; see scripts/prereqs).
prereqs-run prereqs-test prereqs-bench:
	@scripts/prereqs $(@:prereqs-%=%)

# modules fetches every module the build, the tests and the tools need, so that nothing
# is downloaded once the tests run in their offline network namespace.
modules:
	$(GO) mod download
	$(GO) list -deps -test ./... >/dev/null
	cd tools/headscale && $(GO) mod download
	cd tools/tailscaled && $(GO) mod download

# run is the lab: a whole threes on this machine with no Tailscale account (scripts/lab):
# headscale, the bridge, the appliance, the lab image and one VM on the tailnet, in a
# network namespace of its own with its own libvirtd. Ctrl-C tears it all down. Needs root.
run: prereqs-run build headscale tailscaled labimage
	scripts/testenv scripts/lab

# serve runs the appliance on this host for a real tailnet (needs root; libvirtd and the
# bridge for VMs). Pass serve's flags in ARGS, e.g. make serve ARGS='--control-url
# https://hs.example.com'.
serve: prereqs-run build
	$(BIN)/threes serve $(ARGS)

# headscale is a real control server the tests run on loopback; built from its own
# module in tools/headscale so its dependencies stay out of ours.
headscale: $(BIN)/headscale
$(BIN)/headscale: tools/headscale/go.mod
	cd tools/headscale && $(GO) build -o $(BIN)/headscale github.com/juanfont/headscale/cmd/headscale

# tailscaled and tailscale are a user's own Tailscale daemon and CLI: for testing the CLI
# through its LocalAPI, OpenSSH through `tailscale nc`, and for the lab image's guests.
tailscaled: $(BIN)/tailscaled $(BIN)/tailscale
$(BIN)/tailscaled: tools/tailscaled/go.mod
	cd tools/tailscaled && $(GO) build -o $(BIN)/tailscaled tailscale.com/cmd/tailscaled
$(BIN)/tailscale: tools/tailscaled/go.mod
	cd tools/tailscaled && $(GO) build -o $(BIN)/tailscale tailscale.com/cmd/tailscale

# testimage is a tiny direct-kernel VM image made from Debian packages (kernel and
# busybox), which the QEMU tests boot under TCG, plus a 1 GiB disk for the create bench.
testimage: $(BIN)/testimage/vmlinuz
$(BIN)/testimage/vmlinuz: scripts/mkimage
	scripts/mkimage $(BIN)/testimage

# cloudimage is a Debian 12 cloud image: systemd, cloud-init and OpenSSH as Debian ships
# them, plus tailscale/tailscaled from bin/ (scripts/mkcloudimage; root, mmdebstrap, a few
# minutes). TestCloudImageOnQEMU boots it under the appliance (THREES_CLOUDIMAGE).
cloudimage: $(BIN)/cloudimage/disk.qcow2
$(BIN)/cloudimage/disk.qcow2: scripts/mkcloudimage $(BIN)/tailscaled $(BIN)/tailscale
	scripts/mkcloudimage $(BIN)/cloudimage $(BIN)

# labimage is the test image plus Tailscale: a guest that joins the tailnet by itself
# (scripts/mkimage --tailscaled), which the journey test and the lab boot. Its tailscaled
# is built from the pinned tailscale.com module with the CLI inside and only the features
# a guest needs (TUN routing, the IPN bus for `tailscale up`, LocalAPI user checks): about
# 14 MB instead of 76 MB for the pair, so the initramfs stays small under TCG.
LAB_TS_FEATURES := osrouter,ipnbus,unixsocketidentity
labimage: $(BIN)/labimage/vmlinuz
$(BIN)/labimage/vmlinuz: scripts/mkimage $(BIN)/lab-tailscaled
	scripts/mkimage --tailscaled $(BIN)/lab-tailscaled $(BIN)/labimage
$(BIN)/lab-tailscaled: tools/tailscaled/go.mod
	cd tools/tailscaled && tags=$$($(GO) run tailscale.com/cmd/featuretags --min --add=$(LAB_TS_FEATURES)) && \
		CGO_ENABLED=0 $(GO) build -tags "ts_include_cli,$$tags" -ldflags '-s -w' -o $(BIN)/lab-tailscaled tailscale.com/cmd/tailscaled

# test runs the whole suite as root inside a fresh network namespace that holds only
# loopback, its own libvirtd, and what the tests add (see scripts/testenv).
test: prereqs-test modules build headscale tailscaled testimage labimage cloudimage
	scripts/testenv $(MAKE) --no-print-directory test-go fuzz

# -p 1: one package's tests at a time. Real tailnets, headscale and TCG guests share two
# cores; run side by side, a slow headscale register makes a client send it again and
# meet its own single-use key already spent ("authkey already used").
test-go:
	THREES_BIN=$(BIN)/threes THREES_HEADSCALE=$(BIN)/headscale THREES_TAILSCALED=$(BIN)/tailscaled THREES_TAILSCALE=$(BIN)/tailscale THREES_TESTIMAGE=$(BIN)/testimage THREES_LABIMAGE=$(BIN)/labimage GOPROXY=off $(GO) test -p 1 -count=1 -timeout 40m ./...

fuzz:
	@set -e; for t in $$(grep -rlE '^func Fuzz' --include='*_test.go' . | xargs -n1 dirname | sort -u); do \
		for f in $$(grep -hoE '^func Fuzz[A-Za-z0-9_]+' $$t/*_test.go | cut -d' ' -f2); do \
			echo "fuzz $$t $$f ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$t; \
		done; \
	done

# bench runs the Go benchmarks (API over the tailnet vs loopback, database on one node
# and on three: VM record creates/s and p50/p99 through the leader and a follower, IPAM,
# DHCP, hypervisor, and a VM from create to each phase onto the tailnet beside plain QEMU
# booting the same image), then the time from losing the database's leader to the next
# acknowledged write, 5 failovers each way (BenchmarkFailover forms a cluster per failover,
# so a time-bound run of it takes minutes), then the side-by-side DHCP and metadata
# benchmark against Kea, dnsmasq and wrk (bench/netboot/run.sh). Needs root.
bench: prereqs-bench modules build headscale testimage labimage
	THREES_TESTIMAGE=$(BIN)/testimage THREES_LABIMAGE=$(BIN)/labimage THREES_HEADSCALE=$(BIN)/headscale scripts/testenv $(GO) test -run '^$$' -bench . -skip '^BenchmarkFailover$$' -benchtime 2s ./...
	$(GO) test -run '^$$' -bench '^BenchmarkFailover$$' -benchtime 5x ./embeddb/
	bash bench/netboot/run.sh

# bench-scale is one host with many VMs (issue 15): one `threes serve` on libvirt's test
# driver with VMS VMs (default 10000) created over the socket by 6 workers; creates/s by
# thousand, `vm all`, idle CPU of serve and libvirtd, restart to serving, and metadata
# requests/s through the appliance beside the in-memory source, in one run
# (appliance/scale_bench_test.go). Needs root, wrk; about 10 minutes at 10000.
VMS ?= 10000
bench-scale: build
	THREES_BIN=$(BIN)/threes THREES_SCALE_VMS=$(VMS) scripts/testenv $(GO) test -run '^$$' -bench '^BenchmarkScale$$' -benchtime 1x -timeout 60m ./appliance/

# mutation measures the tests' efficacy against planted bugs (gremlins) on the
# security-critical packages, one at a time in a namespace with only loopback, and
# prints a table (scripts/mutation). Slow, so not part of test. Needs root.
GREMLINS := github.com/go-gremlins/gremlins/cmd/gremlins@v0.5.0
mutation:
	GOBIN=$(TOOLS) $(GO) install $(GREMLINS)
	scripts/mutation

lint:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$'))" || { gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$'); exit 1; }

# proto regenerates the committed Go code from proto/ with protoc from Debian
# (protobuf-compiler, libprotobuf-dev) and pinned plugins.
proto:
	GOBIN=$(TOOLS) $(GO) install $(PROTOC_GEN_GO)
	GOBIN=$(TOOLS) $(GO) install $(PROTOC_GEN_GO_GRPC)
	PATH=$(TOOLS):$$PATH protoc -I proto -I /usr/include \
		--go_out=proto --go_opt=paths=source_relative \
		--go-grpc_out=proto --go-grpc_opt=paths=source_relative \
		proto/threes/v1/threes.proto

clean:
	rm -rf $(BIN) $(TOOLS)
