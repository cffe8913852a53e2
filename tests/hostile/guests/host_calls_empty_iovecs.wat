;; host_calls_empty_iovecs.wat — one fd_write of 2,097,151 empty iovecs, then a
;; valid response.
;;
;; Why: no byte is copied, so no output cap applies, yet walking the iovecs is
;; host work that grows with their number. The host must check the deadline
;; inside the call (504), not answer 200 long after the deadline.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          done
;;
;; Memory:  0..16777207 the iovecs (zeros: {ptr 0, len 0}); 16777216.. bytes written;
;;          16777232.. the response; 16777280.. its iovec.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 257)

  (global $IOVECS i32 (i32.const 2097151))
  (global $NWRITTEN i32 (i32.const 16777216))
  (global $RESPONSE_IOVEC i32 (i32.const 16777280))

  (data (i32.const 16777232) "content-type: text/plain\n\ndone\n")  ;; 31 bytes

  (func (export "_start")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (global.get $IOVECS)
                          (global.get $NWRITTEN)))
    (i32.store (global.get $RESPONSE_IOVEC) (i32.const 16777232))
    (i32.store offset=4 (global.get $RESPONSE_IOVEC) (i32.const 31))
    (drop (call $fd_write (i32.const 1) (global.get $RESPONSE_IOVEC) (i32.const 1)
                          (global.get $NWRITTEN)))))
