#!/usr/bin/env bash
# vm.sh - kernel-matrix VMs for ctdrop (virtme-ng, software emulation).
#
#   xtask/vm.sh prepare
#       Idempotent. Installs host packages (qemu-system-x86, kmod, busybox-static,
#       udev, iproute2, iptables, bpftool, python3-venv), virtme-ng into a venv under
#       the cache dir, and Debian's 6.1 and 6.12 kernels (downloaded once into
#       ${CTDROP_CACHE:-$HOME/.cache/ctdrop}/kernels; modules copied into
#       /lib/modules/<release> + depmod). Prints one line per kernel.
#
#   xtask/vm.sh run <6.1|6.12> <rwdir> <command...>
#       Boots the guest (2 vCPUs, 2G, TCG) sharing this machine's root fs read-only
#       with <rwdir> writable, runs <command...> as root in the current directory,
#       and exits with the command's exit status (124 on timeout, 125 if the guest
#       never reported one: such a boot is retried once, and the output says so).
#       The guest command's stdout goes to ours; its stderr and the kernel console
#       go to a log file, kept (and its tail printed) when the run fails.
#       See xtask/VM-NOTES.md for what the guests look like.
#
#   xtask/vm.sh list          print "<short> <release> <vmlinuz>" per prepared kernel
#   xtask/vm.sh smoke <rwdir> run the conntrack-table-full smoke test on every kernel
#
# Environment:
#   CTDROP_CACHE          cache dir (default $HOME/.cache/ctdrop)
#   CTDROP_VM_TIMEOUT     seconds before a guest run is killed (default 600)
#   CTDROP_VM_MEM         guest memory (default 2G)
#   CTDROP_VM_CPUS        guest vCPUs (default 2)
#   CTDROP_VM_KVM=1       use KVM instead of TCG (KVM is broken on the dev machines)
#   CTDROP_VM_ACCEL       qemu -accel value under TCG (default tcg,thread=single: see run)
#   CTDROP_VM_VERBOSE=1   also show the kernel console on stderr while the guest runs
#   CTDROP_VM_LOGDIR      where guest console logs go (default $CTDROP_CACHE/vm-logs);
#                         a failed boot's log is kept and its path printed
#   CTDROP_VM_BLACKLIST   modules the guest must not load (default: hardware/crypto
#                         drivers udev would load; set to "" to allow everything)
#   CTDROP_PKG_6_1 / CTDROP_PKG_6_12   override the kernel package names
set -euo pipefail

CACHE="${CTDROP_CACHE:-$HOME/.cache/ctdrop}"
KDIR="$CACHE/kernels"
# Guest console logs of failed boots (kept) and of running ones.
LOGDIR="${CTDROP_VM_LOGDIR:-$CACHE/vm-logs}"
VENV="$CACHE/venv"
# CTDROP_VNG: a stand-in for vng (the tests check the retry policy with one).
VNG="${CTDROP_VNG:-$VENV/bin/vng}"
VNG_PIN="${CTDROP_VNG_VERSION:-1.42}"

# short name -> default package, and a regex used to pick a newer package of the
# same series if Debian has dropped the default one from the archive.
declare -A PKG=(
    [6.1]="${CTDROP_PKG_6_1:-linux-image-6.1.0-50-amd64-unsigned}"
    [6.12]="${CTDROP_PKG_6_12:-linux-image-6.12.107+deb12-amd64-unsigned}"
)
declare -A PKG_RE=(
    [6.1]='^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$'
    [6.12]='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
)
SHORTS=(6.1 6.12)
DEFAULT_BLACKLIST=kvm,kvm_amd,kvm_intel,ahci,libahci,libata,sr_mod,cdrom,sg,scsi_mod,\
i2c_i801,i2c_smbus,i6300esb,iTCO_wdt,iTCO_vendor_support,lpc_ich,intel_pmc_bxt,pcspkr,\
psmouse,serio_raw,evdev,ccp,qemu_fw_cfg,aesni_intel,crypto_simd,cryptd,ghash_clmulni_intel,\
sha1_ssse3,sha256_ssse3,sha512_ssse3,sha512_generic,crc32_pclmul,crct10dif_pclmul,\
polyval_clmulni,polyval_generic

log() { echo "vm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -q=2 >&2
        APT_UPDATED=1
    fi
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# ---------------------------------------------------------------- host packages
HOST_PKGS=(qemu-system-x86 kmod busybox-static udev iproute2 iptables bpftool python3-venv coreutils)

install_host_pkgs() {
    local missing=() p
    for p in "${HOST_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    log "installing ${missing[*]}"
    apt_update_once
    local out
    out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" 2>&1) \
        || { echo "$out" >&2; die "apt-get install failed"; }
}

install_vng() {
    local stamp="$VENV/.ctdrop-virtme-ng-$VNG_PIN"
    [ -x "$VNG" ] && [ -f "$stamp" ] && return 0
    log "installing virtme-ng $VNG_PIN into $VENV"
    mkdir -p "$CACHE"
    # Debian's python3 explicitly: a pyenv/other python on PATH may lack venv.
    [ -x "$VENV/bin/python3" ] || /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_PIN" >&2
    [ -x "$VNG" ] || die "virtme-ng install did not produce $VNG"
    rm -f "$VENV"/.ctdrop-virtme-ng-* && touch "$stamp"
}

# ---------------------------------------------------------------- kernels
# Sets REL to the kernel release of <short>, or fails.
kernel_release() {
    local short=$1 f="$KDIR/$1.release"
    [ -s "$f" ] || return 1
    REL=$(<"$f")
}

pick_pkg() {
    local short=$1 pkg=${PKG[$1]}
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
        apt_update_once
    fi
    if apt-cache show "$pkg" >/dev/null 2>&1; then
        echo "$pkg"; return
    fi
    # Default package gone from the archive: take the newest of the same series.
    pkg=$(apt-cache search --names-only "${PKG_RE[$short]}" | awk '{print $1}' | sort -V | tail -n1)
    [ -n "$pkg" ] || die "no kernel package found for $short"
    log "note: ${PKG[$short]} unavailable, using $pkg"
    echo "$pkg"
}

prepare_kernel() {
    local short=$1 pkg="" deb="" tree rel
    if kernel_release "$short" && [ -f "$KDIR/vmlinuz-$REL" ] \
        && [ -f "/lib/modules/$REL/modules.dep" ]; then
        echo "$short $REL $KDIR/vmlinuz-$REL"
        return
    fi
    mkdir -p "$KDIR/debs"
    # Reuse the cached .deb if there is one (e.g. /lib/modules was wiped).
    [ -s "$KDIR/$short.pkg" ] && pkg=$(<"$KDIR/$short.pkg") \
        && deb=$(ls "$KDIR/debs/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        pkg=$(pick_pkg "$short")
        deb=$(ls "$KDIR/debs/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    fi
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        (cd "$KDIR/debs" && apt-get download -q=2 -o APT::Sandbox::User=root "$pkg" >&2)
        deb=$(ls "$KDIR/debs/${pkg}"_*.deb | head -n1)
    fi
    tree="$KDIR/tree-$short.tmp"
    rm -rf "$tree" && mkdir -p "$tree"
    dpkg -x "$deb" "$tree"
    rel=$(ls "$tree/lib/modules" | head -n1)
    [ -n "$rel" ] && [ -f "$tree/boot/vmlinuz-$rel" ] || die "unexpected layout in $deb"
    # vmlinuz must live outside the extracted tree, else vng looks for modules beside it.
    cp "$tree/boot/vmlinuz-$rel" "$KDIR/vmlinuz-$rel"
    install_modules "$tree" "$rel"
    rm -rf "$tree"
    echo "$pkg" > "$KDIR/$short.pkg"
    echo "$rel" > "$KDIR/$short.release"
    echo "$short $rel $KDIR/vmlinuz-$rel"
}

install_modules() {
    local tree=$1 rel=$2
    if [ -f "/lib/modules/$rel/modules.dep" ] && [ ! -f "/lib/modules/$rel/.ctdrop-installed" ]; then
        # The host has this very kernel installed (Debian package): leave it alone.
        log "using the system's /lib/modules/$rel"
        return
    fi
    log "installing modules for $rel into /lib/modules/$rel"
    rm -rf "/lib/modules/$rel"
    mkdir -p /lib/modules
    cp -a "$tree/lib/modules/$rel" "/lib/modules/$rel"
    depmod "$rel"
    touch "/lib/modules/$rel/.ctdrop-installed"
}

cmd_prepare() {
    need_root
    install_host_pkgs
    install_vng
    local s
    for s in "${SHORTS[@]}"; do prepare_kernel "$s"; done
}

cmd_list() {
    local s
    for s in "${SHORTS[@]}"; do
        kernel_release "$s" && echo "$s $REL $KDIR/vmlinuz-$REL"
    done
    return 0
}

# ---------------------------------------------------------------- run
cmd_run() {
    [ $# -ge 3 ] || die "usage: vm.sh run <6.1|6.12> <rwdir> <command...>"
    local short=$1 rwdir=$2; shift 2
    [ -n "${PKG[$short]:-}" ] || die "unknown kernel '$short' (want one of ${SHORTS[*]})"
    kernel_release "$short" || die "kernel $short not prepared: run 'xtask/vm.sh prepare'"
    local rel=$REL vmlinuz="$KDIR/vmlinuz-$REL"
    [ -f "$vmlinuz" ] && [ -x "$VNG" ] && [ -f "/lib/modules/$rel/modules.dep" ] \
        || die "kernel $short incomplete: run 'xtask/vm.sh prepare'"
    mkdir -p "$rwdir"
    rwdir=$(realpath "$rwdir")

    # The command goes into a script in rwdir: no quoting through vng/the guest shell.
    local script="$rwdir/.vm-run.$$.sh" status="$rwdir/.vm-exit-status.$$"
    rm -f "$status"
    {
        echo '#!/bin/bash'
        printf 'export PATH=%q\n' "$PATH"
        printf 'export CTDROP_VM_KERNEL=%q CTDROP_VM_RWDIR=%q\n' "$short" "$rwdir"
        printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
        printf '%q ' "$@"; echo
        printf 'echo $? > %q\n' "$status"
        echo 'sync'
    } > "$script"
    chmod +x "$script"

    # --force-9p: vng otherwise spends ~6 s trying (and failing) to start
    # Debian 12's virtiofsd before falling back to 9p anyway.
    local args=(--force-9p --cpus "${CTDROP_VM_CPUS:-2}" -m "${CTDROP_VM_MEM:-2G}" -r "$vmlinuz" --rwdir "$rwdir")
    [ "${CTDROP_VM_KVM:-0}" = 1 ] || args+=(--disable-kvm)
    # Keep udev's coldplug from loading drivers nobody here needs (kvm, ahci/cdrom,
    # watchdogs, input, crypto accel): under TCG that halves the boot time.
    local bl=${CTDROP_VM_BLACKLIST-$DEFAULT_BLACKLIST}
    [ -z "$bl" ] || args+=(-a "module_blacklist=$bl")
    # no_timer_check: under TCG on a loaded host the guest's IO-APIC timer
    # check (check_timer) can miss the emulated timer's ticks and panic with
    # "IO-APIC + timer doesn't work!" before init runs; vng then exits 255
    # with no status. That was the occasional "vng exit 255" on fresh
    # machines (load 14: apt, builds). The check guards against broken
    # 1990s boards, not QEMU's timer.
    args+=(-a no_timer_check)
    # Always -v: the kernel console is what says why a guest died before
    # reporting a status (panic, init failure, missing virtio ports). It
    # goes to stderr together with the guest command's stderr, so both are
    # kept in a log file: printed on failure, removed on success.
    args+=(-v)
    # One TCG thread for all vCPUs (the guest still has 2 CPUs). Multi-
    # threaded TCG in QEMU < 8.1 (Debian 12 ships 7.2) can run stale
    # translations of kernel text another vCPU has just patched: the 6.12
    # guest died with "Oops: int3" in sk_skb_reason_drop (the kfree_skb
    # tracepoint's static key) or a call to address 0 under nf_conntrack_in
    # (ftrace/kprobe call sites) when ctdrop attached during a flood: 3 of
    # 13 boots here, both boots of the last CI run; 0 of 16 with
    # thread=single. text_poke_bp is sound on hardware; QEMU 8.1 fixed the
    # race ("accel/tcg: Always lock pages before translation").
    if [ "${CTDROP_VM_KVM:-0}" != 1 ]; then
        args+=(--qemu-opt=-accel --qemu-opt="${CTDROP_VM_ACCEL:-tcg,thread=single}")
    fi
    mkdir -p "$LOGDIR"
    local attempt rc log
    for attempt in 1 2; do
        log="$LOGDIR/console-$short-$(date +%Y%m%d-%H%M%S)-$$-$attempt.log"
        rm -f "$status"
        rc=0
        guest_once "$log" "$script" "${args[@]}" || rc=$?
        if [ -s "$status" ]; then
            rc=$(<"$status")
            rm -f "$status" "$script"
            if [ "$rc" = 0 ]; then
                rm -f "$log"
            else
                log "guest command on $short exited $rc; console and stderr: $log"
                tail -n 40 "$log" | sed 's/^/vm.sh: | /' >&2
            fi
            [ "$attempt" = 1 ] || log "note: the first boot of $short never reported a status; this retry did"
            return "$rc"
        fi
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            rm -f "$script"
            log "guest timed out after ${CTDROP_VM_TIMEOUT:-600}s; console and stderr: $log"
            tail -n 40 "$log" | sed 's/^/vm.sh: | /' >&2
            return 124
        fi
        log "guest on $short did not report an exit status (vng exit $rc); console and stderr kept: $log"
        tail -n 40 "$log" | sed 's/^/vm.sh: | /' >&2
        # Only a boot that never reported a status is retried, once: a
        # command that ran and failed is never run twice.
        [ "$attempt" = 1 ] && log "retrying the $short boot once"
    done
    rm -f "$script"
    return 125
}

# One boot. qemu re-opens /proc/self/fd/{1,2} for the guest's stdout,
# stderr and console; on a regular file that restarts at offset 0 and
# overwrites what was there (NUL-filled holes), so both go through pipes:
# stdout to ours, stderr (console included) to the log file.
guest_once() {
    local log=$1 script=$2; shift 2
    local rc=0 keep=(cat)
    # CTDROP_VM_VERBOSE=1: the console on stderr as it happens, too.
    [ "${CTDROP_VM_VERBOSE:-0}" = 1 ] && keep=(tee /dev/stderr)
    # pipefail (set above): the status is vng's unless a cat failed.
    {
        PATH="$VENV/bin:$PATH" timeout -k 15 "${CTDROP_VM_TIMEOUT:-600}" \
            "$VNG" "$@" --exec "/bin/bash $script" </dev/null 2>&1 1>&3 3>&- | "${keep[@]}" > "$log"
    } 3>&1 | cat || rc=$?
    return "$rc"
}

# ---------------------------------------------------------------- smoke test
# Runs inside the guest: fill a 64-entry conntrack table with a UDP flood
# between two namespaces and show the receiver's drop counter rising.
smoke_guest() {
    set -u
    echo "== kernel $(uname -r), cpus $(nproc)"
    modprobe nf_conntrack
    ip netns add ctd-a
    ip netns add ctd-b
    ip link add veth-a netns ctd-a type veth peer name veth-b netns ctd-b
    ip -n ctd-a addr add 198.18.0.1/24 dev veth-a
    ip -n ctd-b addr add 198.18.0.2/24 dev veth-b
    ip -n ctd-a link set veth-a up; ip -n ctd-a link set lo up
    ip -n ctd-b link set veth-b up; ip -n ctd-b link set lo up
    ip netns exec ctd-b iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    sysctl -w net.netfilter.nf_conntrack_max=64
    drops() { # sum over CPUs of the (hex) "drop" column of the receiver's stats
        local -a hdr f; local i c=-1 sum=0
        {
            read -r -a hdr
            for i in "${!hdr[@]}"; do [ "${hdr[$i]}" = drop ] && c=$i; done
            while read -r -a f; do sum=$((sum + 16#${f[$c]})); done
        } < <(ip netns exec ctd-b cat /proc/net/stat/nf_conntrack)
        echo "$sum"
    }
    echo "drop before: $(drops)"
    ip netns exec ctd-a bash -c 'for p in $(seq 1000 1200); do echo x > /dev/udp/198.18.0.2/$p; done' 2>/dev/null || true
    echo "drop after:  $(drops)"
    echo "count: $(ip netns exec ctd-b cat /proc/sys/net/netfilter/nf_conntrack_count)"
    ip netns exec ctd-b cat /proc/net/stat/nf_conntrack
    [ "$(drops)" -gt 0 ]
}

cmd_smoke() {
    [ $# = 1 ] || die "usage: vm.sh smoke <rwdir>"
    local rwdir s rc=0 one self
    self=$(realpath "$0")
    mkdir -p "$1" && rwdir=$(realpath "$1")
    for s in "${SHORTS[@]}"; do
        one=0
        cmd_run "$s" "$rwdir" /bin/bash -c \
            "source <(sed -n '/^smoke_guest()/,/^}/p' $(printf %q "$self")); smoke_guest > $(printf %q "$rwdir/smoke-$s.txt") 2>&1" \
            || one=$?
        echo "--- $s: exit $one"
        cat "$rwdir/smoke-$s.txt" 2>/dev/null || true
        [ "$one" = 0 ] || rc=$one
    done
    return "$rc"
}

case "${1:-}" in
    prepare) shift; cmd_prepare "$@" ;;
    run) shift; cmd_run "$@" ;;
    list) shift; cmd_list "$@" ;;
    smoke) shift; cmd_smoke "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
