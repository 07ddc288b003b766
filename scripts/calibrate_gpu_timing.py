# GPU step timing for `tandem sim --timing gpu` (docs/benchmarks.md): Llama-3-8B bf16 layer x32 + head.
import json,torch as T,torch.nn.functional as F
d,t=dict(device="cuda",dtype=T.bfloat16),T.randn
H,NH,NK,HD,FF,L=4096,32,8,128,14336,32
Wq,Wo,Wg,Wd,Wh=t(H,(NH+2*NK)*HD,**d),t(NH*HD,H,**d),t(H,2*FF,**d),t(FF,H,**d),t(H,128256,**d)
def at(q,k,v,c):return F.scaled_dot_product_attention(q,k,v,is_causal=c,enable_gqa=True)
def mlp(x,a):
 y=a@Wo+x;g,u=(y@Wg).split(FF,-1);return(F.silu(g)*u)@Wd+y
def pre(x,k,v,c):
 n=x.shape[0];q=(x@Wq)[:,:NH*HD].reshape(1,n,NH,HD).transpose(1,2)
 return mlp(x,at(q,k[:,:,:c+n],v[:,:,:c+n],c==0).transpose(1,2).reshape(n,NH*HD))
def dec(x,k,v):
 b=x.shape[0];q=(x@Wq)[:,:NH*HD].reshape(b,NH,1,HD);return mlp(x,at(q,k,v,False).reshape(b,NH*HD))
def tm(f):
 for _ in range(3):f()
 r=[]
 for _ in range(10):
  s,e=T.cuda.Event(enable_timing=1),T.cuda.Event(enable_timing=1);s.record();f();e.record();T.cuda.synchronize();r.append(s.elapsed_time(e))
 return sorted(r)[5]
P,D=[],[]
with T.no_grad():
 for n in(512,2048,8192):
  for c in(0,8192,32768):
   x,k,v=t(n,H,**d),t(1,NK,c+n,HD,**d),t(1,NK,c+n,HD,**d)
   P.append(dict(tokens=n,ctx=c,ms=tm(lambda:pre(x,k,v,c))*L+tm(lambda:x[-1:]@Wh)))
 for b in(1,16,64,256):
  for c in(1024,8192):
   x,k,v=t(b,H,**d),t(b,NK,c,HD,**d),t(b,NK,c,HD,**d)
   D.append(dict(seqs=b,ctx=c,ms=tm(lambda:dec(x,k,v))*L+tm(lambda:x@Wh)));del k,v;T.cuda.empty_cache()
def fit(X,y):return T.linalg.lstsq(T.tensor(X,dtype=T.float64),T.tensor(y,dtype=T.float64)[:,None]).solution[:,0].tolist()
print(json.dumps(dict(gpu=T.cuda.get_device_name(),torch=T.__version__,prefill=P,decode=D,
 prefill_fit=fit([[1,p["tokens"],p["tokens"]*(p["ctx"]+p["tokens"]/2)]for p in P],[p["ms"]for p in P]),
 decode_fit=fit([[1,q["seqs"],q["seqs"]*q["ctx"]]for q in D],[q["ms"]for q in D]))))
