;; host_calls_poll_many.wat — one poll_oneoff of 65 subscriptions, then prints
;; the errno it returned as "errno=NN".
;;
;; Why: every subscription is host work done holding the GIL; past the
;; policy's max_poll_subscriptions (default 64) the call must fail with EINVAL
;; (28) and do none of it.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          errno=NN
;;
;; Memory:  0..3119 65 subscriptions (zeros: clock 0, timeout 0, relative, so
;;          all due at once); 4096..6175 their events; 8192..8195 event count;
;;          8200..8207 iovec; 8256.. the response, NN at 8288.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param $in i32) (param $out i32) (param $nsubscriptions i32)
                       (param $nevents i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $SUBSCRIPTIONS i32 (i32.const 65))
  (global $ERRNO_DIGITS i32 (i32.const 8288))

  (data (i32.const 8256) "content-type: text/plain\n\nerrno=NN\n")  ;; 35 bytes

  (func (export "_start")
    (local $errno i32)
    (local.set $errno
      (call $poll_oneoff (i32.const 0) (i32.const 4096) (global.get $SUBSCRIPTIONS)
                         (i32.const 8192)))
    (i32.store8 (global.get $ERRNO_DIGITS)
      (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
    (i32.store8 offset=1 (global.get $ERRNO_DIGITS)
      (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
    (i32.store (i32.const 8200) (i32.const 8256))
    (i32.store (i32.const 8204) (i32.const 35))
    (drop (call $fd_write (i32.const 1) (i32.const 8200) (i32.const 1) (i32.const 8192)))))
