;; trap.wat — prints a valid response, then executes `unreachable`.
;;
;; Why: a trap is a failure (500, classified as a trap) even after complete,
;; valid output; the body names the failure, not the guest's memory.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          about to trap
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\n\nabout to trap\n")  ;; 40 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 40))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    unreachable))
