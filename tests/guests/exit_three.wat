;; exit_three.wat — prints a valid response, then calls proc_exit(3).
;;
;; Why: a nonzero exit code is a failure (500) even when the output before it
;; was a complete, valid response: the exit code decides, not the output.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          exiting with 3
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit"
    (func $proc_exit (param $code i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\n\nexiting with 3\n")  ;; 41 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 41))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 3))))
