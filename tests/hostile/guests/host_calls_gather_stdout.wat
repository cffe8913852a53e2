;; host_calls_gather_stdout.wat — one fd_write to stdout of 512 iovecs, each
;; naming the same 1 MiB of memory: 512 MiB of output from 1 MiB of guest.
;;
;; Why: the host must stop copying at max_response_bytes (502, guest stopped),
;; iovec by iovec; copying the whole gather first raised a worker's RSS by
;; gigabytes and got it OOM-killed.
;;
;; Output:  none that matters: the cap ends the request.
;;
;; Memory:  0..4095 512 iovecs {ptr 65536, len 1 MiB}; 8192..8195 bytes written;
;;          65536..1114111 the region every iovec names (zeros).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 17)

  (global $IOVECS i32 (i32.const 512))
  (global $REGION i32 (i32.const 65536))
  (global $REGION_BYTES i32 (i32.const 1048576))

  (func (export "_start")
    (local $i i32)
    (loop $fill
      (i32.store (i32.mul (local.get $i) (i32.const 8)) (global.get $REGION))
      (i32.store offset=4 (i32.mul (local.get $i) (i32.const 8)) (global.get $REGION_BYTES))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (global.get $IOVECS))))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (global.get $IOVECS) (i32.const 8192)))))
