;; attack_gather.wat — one fd_write of 2,048 iovecs that all point at the same 1 MiB.
;;
;; Why: issue 10, hole 1. The guest owns 1 MiB of memory but asks the host to write 2 GiB;
;; a host that copies the whole gather write before checking the output cap grows by 2 GiB.
;; `_start` does it once on stdout (the cap is max_response_bytes: 502 once fixed); `stderr`
;; does it on stderr in a loop, which must end at the tenant's deadline (504), not later.
;;
;; Memory:  0..16383 the 2,048 iovecs {ptr, len}; 16384..16387 bytes written;
;;          65536..1114111 the 1 MiB every iovec points at (zeros).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 17)

  (global $IOVECS i32 (i32.const 0))
  (global $IOVEC_COUNT i32 (i32.const 2048))
  (global $WRITTEN i32 (i32.const 16384))
  (global $REGION i32 (i32.const 65536))
  (global $REGION_BYTES i32 (i32.const 1048576))

  (func $point_every_iovec_at_the_region
    (local $i i32)
    (local $iovec i32)
    (loop $next
      (local.set $iovec (i32.add (global.get $IOVECS) (i32.shl (local.get $i) (i32.const 3))))
      (i32.store (local.get $iovec) (global.get $REGION))
      (i32.store offset=4 (local.get $iovec) (global.get $REGION_BYTES))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $i) (global.get $IOVEC_COUNT)))))

  (func $gather_write (param $fd i32)
    (drop (call $fd_write (local.get $fd) (global.get $IOVECS) (global.get $IOVEC_COUNT)
                          (global.get $WRITTEN))))

  (func (export "_start")
    (call $point_every_iovec_at_the_region)
    (call $gather_write (i32.const 1)))

  (func (export "stderr")
    (call $point_every_iovec_at_the_region)
    (loop $forever
      (call $gather_write (i32.const 2))
      (br $forever))))
