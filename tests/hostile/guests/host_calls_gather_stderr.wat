;; host_calls_gather_stderr.wat — fd_write to stderr of 65,536 iovecs, each
;; naming the same 1 MiB of memory (64 GiB per call), again and again.
;;
;; Why: stderr is kept only up to max_stderr_bytes; the host must stop copying
;; there (the rest is dropped and counted) and check the deadline inside the
;; call. Copying every iovec first made one call outlast the deadline by
;; seconds.
;;
;; Output:  none: the deadline ends the request (504).
;;
;; Memory:  0..1048575 the region every iovec names (zeros);
;;          1048576..1572863 65,536 iovecs {ptr 0, len 1 MiB}; 1572864.. bytes written.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 25)

  (global $IOVECS i32 (i32.const 65536))
  (global $IOVEC_ARRAY i32 (i32.const 1048576))
  (global $NWRITTEN i32 (i32.const 1572864))
  (global $REGION_BYTES i32 (i32.const 1048576))

  (func (export "_start")
    (local $i i32)
    (loop $fill
      (i32.store offset=4
        (i32.add (global.get $IOVEC_ARRAY) (i32.mul (local.get $i) (i32.const 8)))
        (global.get $REGION_BYTES))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (global.get $IOVECS))))
    (loop $again
      (drop (call $fd_write (i32.const 2) (global.get $IOVEC_ARRAY) (global.get $IOVECS)
                            (global.get $NWRITTEN)))
      (br $again))))
