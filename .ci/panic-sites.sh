#!/usr/bin/env bash
# Lists where a binary can still reach a panic: every call or branch into Rust's panic machinery
# (core::panicking::*, the panic handler, slice/option/result failure helpers), with the function
# it sits in and the inlined source chain of that instruction. Used by .ci/run to explain a
# failed panic-freedom link; needs llvm-objdump and llvm-addr2line (Debian's `llvm` package) and
# a binary built with debug info.
# Usage: panic-sites.sh <elf>
set -euo pipefail
elf=$1
panic_re='core::panicking::|rust_begin_unwind|rust_panic|core::slice::index::|slice_(start|end)_index|slice_index_order_fail|core::option::(expect_failed|unwrap_failed)|core::result::unwrap_failed|panic_bounds_check|core::cell::panic_|core::panic::|std::panicking::'
llvm-objdump -d --no-show-raw-insn -C "$elf" | awk -v re="$panic_re" '
  /^[0-9a-f]+ <.*>:$/ {
    name = $0; sub(/^[0-9a-f]+ </, "", name); sub(/>:$/, "", name)
    if (name !~ /^\$/) fn = name
    next
  }
  # A call or branch whose target is a panic function, from a function that is not one itself.
  /\t(bl|blx|b|b\.w|beq\.w|bne\.w|call|callq|jmp|jmpq|j[a-z]+)\t/ && match($0, /<[^>]*>/) {
    target = substr($0, RSTART + 1, RLENGTH - 2)
    sub(/\+0x[0-9a-f]+$/, "", target)
    if (target ~ re && fn !~ re) {
      addr = $1; sub(/:$/, "", addr)
      print addr "\t" fn "\t" target
    }
  }' | while IFS=$'\t' read -r addr fn target; do
    echo "panic site at 0x$addr in $fn -> $target"
    llvm-addr2line -e "$elf" -f -C -i -a "0x$addr" | tail -n +2 | paste - - | sed 's/^/    /'
  done
