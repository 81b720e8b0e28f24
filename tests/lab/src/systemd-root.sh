#!/bin/sh
# Boots systemd as PID 1 of the namespaces this runs in (a new pid, mount, uts, ipc and
# cgroup namespace inside a test's own network namespace), on a private root: never on the
# machine's own /, whose /tmp systemd-tmpfiles would empty.
#
# Environment: NAME (the machine), ROOT (an empty directory to build the root in), UPPER
# (a directory for the writable layers), BINDS (paths bound read-only at the same place),
# UNIT (what systemd starts), WRITABLE_USR (1: /usr and dpkg's database are overlays, so a
# package can be installed).
set -eu

mount --make-rprivate /
mount -t tmpfs -o mode=755 root "$ROOT"
cd "$ROOT"
mkdir -p usr etc tmp var run dev proc sys srv root home mnt opt
overlay() { # overlay LOWER TARGET LAYER
    mkdir -p "$UPPER/$3" "$UPPER/$3.work"
    mount -t overlay overlay -o "lowerdir=$1,upperdir=$UPPER/$3,workdir=$UPPER/$3.work" "$2"
}
if [ "${WRITABLE_USR:-}" = 1 ]; then
    overlay /usr usr usr
else
    mount --bind /usr usr
    mount -o remount,bind,ro usr
fi
for d in bin lib lib64 sbin; do
    [ -e "/usr/$d" ] && ln -s "usr/$d" "$d"
done
overlay /etc etc etc
# What the releases are: kept with the writable layers, so a "reboot" finds them.
mkdir -p "$UPPER/srv"
mount --bind "$UPPER/srv" srv
mount -t tmpfs -o mode=1777 tmp tmp
mount -t tmpfs -o mode=755 run run
mount -t tmpfs -o mode=755 var var
mkdir -p var/lib var/log var/cache var/tmp
ln -s ../run var/run
if [ "${WRITABLE_USR:-}" = 1 ]; then
    mkdir -p var/lib/dpkg
    overlay /var/lib/dpkg var/lib/dpkg dpkg
fi

mount -t tmpfs -o mode=755 dev dev
for d in null zero full random urandom tty; do
    touch "dev/$d"
    mount --bind "/dev/$d" "dev/$d"
done
mkdir dev/pts dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts dev/pts
ln -s pts/ptmx dev/ptmx
mount -t tmpfs -o mode=1777 shm dev/shm
# systemd logs only to a tty: the pty `script` gave this shell.
touch dev/console
mount --bind "$(tty)" dev/console

mount -t proc proc proc
mount --bind proc/sys proc/sys
mount --bind proc/sys/net proc/sys/net
mount -o remount,bind,ro proc/sys
mount -o remount,bind,rw proc/sys/net
mount -t sysfs -o ro sysfs sys
mount -t cgroup2 cgroup2 sys/fs/cgroup

for b in $BINDS; do
    mkdir -p ".$b"
    mount --bind "$b" ".$b"
    mount -o remount,bind,ro ".$b"
done

mkdir -p etc/systemd/system
# Only the test's own units start: the services the host enabled are not this machine's
# (removed in the overlay's upper layer only; the host's /etc is untouched).
for w in etc/systemd/system/*.wants; do
    [ -d "$w" ] && find "$w" -mindepth 1 -maxdepth 1 ! -name 'web@*' -exec rm -f {} +
done
cat > etc/systemd/system/test.target <<'EOF'
[Unit]
Description=what a switcheroo test needs: the journal
Wants=systemd-journald.socket systemd-journald.service
EOF

mkdir oldroot
pivot_root . oldroot
cd /
umount -l /oldroot
rmdir /oldroot
exec env -i container="$NAME" PATH=/usr/sbin:/usr/bin \
    /usr/lib/systemd/systemd --unit="$UNIT" --log-target=console
