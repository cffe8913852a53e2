;; exit_zero.wat — prints a valid response, then calls proc_exit(0).
;;
;; Why: Spin's rule, chosen here: exiting with 0 after valid output is
;; success (200), though wasmtime reports it as an exit trap. WAGI gave 500.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          exiting with 0
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit"
    (func $proc_exit (param $code i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\n\nexiting with 0\n")  ;; 41 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 41))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 0))))
